"""`ste`: fake-quantized forward, straight-through backward (zero outside the clip range)."""

from __future__ import annotations

from ..quant.spec import validate_bool
from ..quant.surrogates import StraightThrough, Surrogate
from .base import Option, QatMethod, register_method


@register_method
class Ste(QatMethod):
    """RTN fake quantization in the forward; the gradient passes through rounding unchanged."""

    name = "ste"
    options = (Option("learned_scales", False, validate_bool, "learn per-group scales with LSQ's gradient"),)

    def surrogate(self) -> Surrogate:
        return StraightThrough()
