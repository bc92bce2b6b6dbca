"""torch.nn modules built on the quantization math (no transformers dependency)."""

from .packed_linear import PackedLinear
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
    "is_lotion_model",
    "latent_weights",
    "lotion_layers",
    "matches_module",
    "quantizable_linears",
    "replace_linear_layers",
]
