"""Quantization math in plain PyTorch: grids, STE/StableQAT/LSQ autograd and LOTION.

Knows nothing of transformers; everything else in hf_lotion builds on it, and every fast path is
tested against it.
"""

from .fake_quant import (
    fake_quantize,
    lsq_gradient_scale,
    stableqat_fake_quantize,
    stableqat_surrogate,
    ste_fake_quantize,
)
from .grid import (
    absmax_scales,
    dequantize,
    effective_scale_dtype,
    fake_quantize_rtn,
    gradient_window,
    grouped,
    int_range,
    quantize_rtn,
    round_scales,
    scale_divisor,
    scale_floor,
    scale_torch_dtype,
)
from .lotion import (
    add_penalty_grad,
    grid_distance,
    lotion_penalty,
    lotion_penalty_grad,
    lotion_regularizer,
    rounding_position,
    rounding_variance,
)
from .packing import pack_int, packed_words, unpack_int
from .spec import DEFAULT_GRID_BY_BITS, GRIDS, SCALE_DTYPES, SUPPORTED_BITS, QuantSpec
from .surrogates import FourierSurrogate, StraightThrough, Surrogate, as_surrogate

__all__ = [
    "DEFAULT_GRID_BY_BITS",
    "GRIDS",
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "FourierSurrogate",
    "QuantSpec",
    "StraightThrough",
    "Surrogate",
    "absmax_scales",
    "add_penalty_grad",
    "as_surrogate",
    "dequantize",
    "effective_scale_dtype",
    "fake_quantize",
    "fake_quantize_rtn",
    "gradient_window",
    "grid_distance",
    "grouped",
    "int_range",
    "lotion_penalty",
    "lotion_penalty_grad",
    "lotion_regularizer",
    "lsq_gradient_scale",
    "pack_int",
    "packed_words",
    "quantize_rtn",
    "round_scales",
    "rounding_position",
    "rounding_variance",
    "scale_divisor",
    "scale_floor",
    "scale_torch_dtype",
    "stableqat_fake_quantize",
    "stableqat_surrogate",
    "ste_fake_quantize",
    "unpack_int",
]
