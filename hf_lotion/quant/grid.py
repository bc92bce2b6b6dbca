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
* With a `scale_dtype` (`QuantSpec.scale_dtype`), every scale the forward uses is first rounded to a value
  representable in that dtype and kept in the compute dtype (`round_scales`): `s.to(scale_dtype).to(compute)`.
  For bf16 compute and fp16 scales this is fp16 then bf16, so the values fit both dtypes.
"""

from __future__ import annotations

import functools
import math

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


def scale_torch_dtype(scale_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`QuantSpec.scale_dtype` ("float16", ...) as a torch dtype; None stays None."""
    if scale_dtype is None or isinstance(scale_dtype, torch.dtype):
        return scale_dtype
    return getattr(torch, scale_dtype)


def effective_scale_dtype(compute_dtype: torch.dtype, scale_dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype whose precision the scales really have: the coarser of the compute and the scale dtype.

    Pass it to `gradient_window`. Example:
        >>> effective_scale_dtype(torch.float32, "float16"), effective_scale_dtype(torch.bfloat16, "float16")
        (torch.float16, torch.bfloat16)
    """
    dtype = scale_torch_dtype(scale_dtype)
    if dtype is None or torch.finfo(compute_dtype).eps >= torch.finfo(dtype).eps:
        return compute_dtype
    return dtype


@functools.cache
def _largest_common(a: torch.dtype, b: torch.dtype) -> float:
    """The largest value both float dtypes hold exactly (fp16's max, 65504, is 65536 in bf16: inf in fp16)."""
    high = min(torch.finfo(a).max, torch.finfo(b).max)
    for _ in range(2):
        for dtype in (a, b):
            value = torch.tensor(high, dtype=torch.float64).to(dtype)
            if not torch.isfinite(value) or float(value) > high:  # rounded up: step one ulp down
                ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(high))
                value = torch.tensor(float(value) - ulp, dtype=torch.float64).to(dtype)
            high = float(value)
    return high


class _RoundScales(torch.autograd.Function):
    """`s.to(scale_dtype).to(s.dtype)`, kept inside both dtypes' positive range; straight-through backward."""

    @staticmethod
    def forward(ctx, scales, dtype):
        both = (torch.finfo(dtype), torch.finfo(scales.dtype))
        # Smallest positive (subnormal) value and largest value of both dtypes: powers of two / exact in both.
        low = max(info.smallest_normal * info.eps for info in both)
        return scales.clamp(low, _largest_common(dtype, scales.dtype)).to(dtype).to(scales.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_scales(scales: torch.Tensor, scale_dtype: str | torch.dtype | None) -> torch.Tensor:
    """Scales rounded to values representable in `scale_dtype`, in their own dtype (None: unchanged).

    Differentiable with a straight-through gradient, so learned (LSQ) scales keep training while the forward
    uses the rounded value. Values are kept positive (at least the smallest subnormal of both dtypes).

    Example:
        >>> round_scales(torch.tensor([0.1]), "float16").item()
        0.0999755859375
    """
    dtype = scale_torch_dtype(scale_dtype)
    if dtype is None:
        return scales
    return _RoundScales.apply(scales, dtype)


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
