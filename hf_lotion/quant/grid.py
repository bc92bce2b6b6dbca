"""Group-wise symmetric integer grids: scales, round-to-nearest quantization and dequantization.

Conventions shared by every path (reference, Triton, packed):

* A weight `(out_features, in_features)` is split into groups of `group_size` consecutive input
  features; each group of each row has one scale `s > 0`, stored as `(out_features, n_groups)` in the
  weight's dtype.
* Integer levels `q` lie in `[-2**(bits-1), 2**(bits-1) - 1]`; `w_hat = s * q`.
* `v = w / s` and `w_hat = q * s` are computed in float32 (float64 for float64 inputs) from the stored
  (compute-dtype) values and rounded once to the compute dtype, so every path gives bit-identical
  dequantized weights.
* Rounding is half-to-even (`torch.round`).
"""

from __future__ import annotations

import torch

from .spec import resolve_group_size

# Scales are floored at this fraction of the tensor's largest magnitude, so all-zero groups never divide by 0.
SCALE_FLOOR_RATIO = 1e-8


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: low-precision inputs are upcast for the math."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def int_range(bits: int) -> tuple[int, int]:
    """Smallest and largest integer level of a signed `bits`-bit grid, e.g. `(-8, 7)` for 4 bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_divisor(bits: int, grid: str) -> float:
    """What the group absmax is divided by to get the scale.

    `"restricted"`: `2**(bits-1) - 1`, the absmax lands on the top level and only `2**bits - 1` levels
    are used (at 2 bits only {-1, 0, 1}). `"full"`: `2**(bits-1) - 1/2` (the torchao / compressed-tensors
    rule), all `2**bits` levels are reachable and the largest positive value clips one level down.
    """
    if grid == "restricted":
        return 2.0 ** (bits - 1) - 1.0
    if grid == "full":
        return 2.0 ** (bits - 1) - 0.5
    raise ValueError(f"grid={grid!r} is not supported; allowed: 'full', 'restricted'.")


def gradient_window(bits: int, scale_dtype: torch.dtype) -> tuple[float, float]:
    """The `v = w / s` that fake-quant backwards pass gradient through: those that round into the range.

    `[qmin - 1/2, qmax + 1/2]`, widened by `2**(bits-1)` ulps of the scale's dtype: an absmax scale rounded to
    bf16 can put the group's largest weight a little past `qmax + 1/2` (full grid), and that weight must train
    like the rest. Weights clipped by a learned (smaller) scale lie further out and get no gradient.

    Example:
        >>> gradient_window(4, torch.float32)
        (-8.500000953674316, 7.500000953674316)
    """
    qmin, qmax = int_range(bits)
    slack = 2.0 ** (bits - 1) * torch.finfo(scale_dtype).eps
    return qmin - 0.5 - slack, qmax + 0.5 + slack


def grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """View `(out, in)` as `(out, n_groups, group_size)`; `group_size=-1` means one group per row."""
    out_features, in_features = t.shape
    size = resolve_group_size(group_size, in_features)
    return t.reshape(out_features, in_features // size, size)


def scale_floor(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest scale allowed for `weight`: a tiny fraction of its absmax, representable in `dtype`."""
    # max |w| in one reduction (no |w| temporary); exact in any dtype.
    tensor_max = torch.linalg.vector_norm(weight.detach(), ord=float("inf")).to(math_dtype(weight))
    return torch.clamp_min(tensor_max * SCALE_FLOOR_RATIO, torch.finfo(dtype).tiny)


def absmax_scales(
    weight: torch.Tensor, bits: int, group_size: int, grid: str = "full", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-group absmax scales `(out_features, n_groups)` in `dtype` (default: the weight's dtype).

    Example:
        >>> absmax_scales(torch.tensor([[1.75, -0.875, 0.25, -0.125]]), bits=4, group_size=4, grid="restricted")
        tensor([[0.2500]])
    """
    dtype = dtype or weight.dtype
    w = weight.detach().to(math_dtype(weight))
    absmax = grouped(w, group_size).abs().amax(dim=-1)
    scales = torch.maximum(absmax / scale_divisor(bits, grid), scale_floor(w, dtype))
    return scales.to(dtype)


def scaled_values(weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """`v = w / s` in float32 (float64 for float64 inputs), shape `(out, n_groups, group_size)`."""
    dtype = math_dtype(weight, scales)
    return grouped(weight.to(dtype), group_size) / scales.to(dtype).unsqueeze(-1)


def quantize_rtn(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest (half-to-even) integer levels `clamp(round(w / s))`, int8, shape `(out, in)`."""
    qmin, qmax = int_range(bits)
    q = torch.round(scaled_values(weight, scales, group_size)).clamp_(qmin, qmax)
    return q.reshape(weight.shape).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """`s * q` as `(out, in)` in `dtype`, computed in float32 (float64 for float64 scales) and rounded once."""
    math = math_dtype(scales)
    w_hat = grouped(q.to(math), group_size) * scales.to(math).unsqueeze(-1)
    return w_hat.reshape(q.shape).to(dtype)


def fake_quantize_rtn(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The deterministic deploy weight `dequantize(quantize_rtn(w))` in the weight's dtype (no autograd)."""
    return dequantize(quantize_rtn(weight, scales, bits, group_size), scales, group_size, weight.dtype)
