"""torch.nn modules built on the quantization math and the QAT methods (no transformers dependency)."""

from .packed_linear import PackedLinear
from .penalty import PenaltyRuntime, add_lotion_penalty, install_penalty, penalty_runtime, remove_penalty
from .qat_linear import LotionLinear
from .replace import (
    is_lotion_model,
    latent_weights,
    lotion_layers,
    matches_module,
    quantizable_linears,
    replace_linear_layers,
)

__all__ = [
    "LotionLinear",
    "PackedLinear",
    "PenaltyRuntime",
    "add_lotion_penalty",
    "install_penalty",
    "is_lotion_model",
    "latent_weights",
    "lotion_layers",
    "matches_module",
    "penalty_runtime",
    "quantizable_linears",
    "remove_penalty",
    "replace_linear_layers",
]
