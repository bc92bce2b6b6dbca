"""`stableqat` (arXiv 2601.19320): fake-quantized forward, Fourier-series surrogate backward, LSQ scales.

The backward multiplies the weight gradient by `g(v) = (1 - c S) / (1 + c S)` (`FourierSurrogate`), a
smooth, bounded stand-in for the derivative of rounding; `stableqat_amplitudes=[]` is exactly STE. The
Triton fake-quant kernel evaluates this family.
"""

from __future__ import annotations

from ..quant.spec import validate_amplitudes, validate_bool
from ..quant.surrogates import FourierSurrogate, Surrogate
from .base import Option, QatMethod, register_method


def _amplitudes(name: str, value: object, owner: str) -> tuple[float, ...]:
    return validate_amplitudes(value, owner)


@register_method
class StableQat(QatMethod):
    """StableQAT: learned scales by default, as its reference code."""

    name = "stableqat"
    options = (
        Option("learned_scales", True, validate_bool, "learn per-group scales with LSQ's gradient"),
        Option("stableqat_amplitudes", (0.21,), _amplitudes, "Fourier amplitudes; [] or [0.0] is STE"),
    )

    def surrogate(self) -> Surrogate:
        return FourierSurrogate(self.stableqat_amplitudes)
