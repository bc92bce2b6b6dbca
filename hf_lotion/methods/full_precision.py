"""`full_precision`: train the latent weights in full precision and round to nearest at export (old name "rtn").

The baseline every QAT method is measured against: the quantized model is RTN of whatever full-precision
training produced.
"""

from __future__ import annotations

from .base import QatMethod, register_method


@register_method
class FullPrecision(QatMethod):
    """Full-precision training; eval mode (and `convert`) use the round-to-nearest weights."""

    name = "full_precision"
    aliases = ("rtn",)
