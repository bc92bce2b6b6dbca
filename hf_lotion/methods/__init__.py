"""QAT methods as registered strategies: `lotion`, `stableqat`, `ste` and the `full_precision` baseline.

Each method is one small module declaring its options, defaults, train-mode weight, backward surrogate and
optional penalty (`QatMethod`). `LotionConfig(method=...)` validates options against the method; the QAT
layer asks its method what to do. Adding a method is one subclass plus `register_method`.
"""

from .base import (
    Option,
    Penalty,
    QatMethod,
    build_method,
    canonical_method_name,
    method_class,
    method_names,
    register_method,
    registered_methods,
    unregister_method,
)
from .full_precision import FullPrecision
from .lotion import Lotion
from .stableqat import StableQat
from .ste import Ste

__all__ = [
    "FullPrecision",
    "Lotion",
    "Option",
    "Penalty",
    "QatMethod",
    "StableQat",
    "Ste",
    "build_method",
    "canonical_method_name",
    "method_class",
    "method_names",
    "register_method",
    "registered_methods",
    "unregister_method",
]
