"""Training diagnostics for quantized layers."""

from __future__ import annotations

import torch
from torch import nn

from hf_lotion.nn import lotion_layers
from hf_lotion.quant.lotion import grid_distance


@torch.no_grad()
def grid_fraction(model: nn.Module, tolerance: float = 0.1) -> float:
    """Fraction of quantized weights within `tolerance` (in units of their scale) of a grid point.

    It rises as QAT pulls weights onto the grid; LOTION's regulariser makes every grid point an attractor.

    Example:
        >>> grid_fraction(model)  # doctest: +SKIP
        0.23
    """
    near, total = 0, 0
    for _, layer in lotion_layers(model):
        spec = layer.spec
        distance = grid_distance(layer.weight, layer.quant_scales(), spec.bits, spec.group_size)
        near += int((distance <= tolerance).sum())
        total += distance.numel()
    return near / total if total else 0.0
