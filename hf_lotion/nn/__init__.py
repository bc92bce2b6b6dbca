"""torch.nn modules built on the quantization math (no transformers dependency)."""

from .qat_linear import LotionLinear
from .replace import lotion_layers, matches_module, quantizable_linears, replace_linear_layers

__all__ = ["LotionLinear", "lotion_layers", "matches_module", "quantizable_linears", "replace_linear_layers"]
