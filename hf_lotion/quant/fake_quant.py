"""Fake quantization with straight-through (STE) and StableQAT surrogate gradients, plus LSQ scale gradients.

Forward: `w_hat = s * clamp(round(w / s), qmin, qmax)` (RTN, identical to the deploy weight).
Backward, with `v = w / s`:

* weight: `dL/dw = dL/dw_hat * 1[v in window] * g(v)`, with `g` a `Surrogate`: `g = 1` for STE;
  StableQAT's Fourier surrogate `g(v) = (1 - c S) / (1 + c S)`, `S = sum_k a_k cos((2k+1) pi (v + round(v)))`,
  `c = sqrt(2) pi`, which is 1 at `v - round(v) = +-1/2` and about 0.0347 on the grid for `a = [0.21]`.
* scale (only when the scale requires grad, LSQ): per element `round(v) - v` for `qmin <= v <= qmax` and
  the clip level outside (LSQ's rule, unchanged), times `1 / sqrt(numel(W) * qmax)`, summed over each
  group. No surrogate here.

The weight's window is the set of `v` that round into the range, `[qmin - 1/2, qmax + 1/2]`, widened by
the scale's rounding error (`gradient_window`). Masking on the unrounded `qmin <= v <= qmax` instead would
freeze the largest positive weight of every group under the full grid: its scale `absmax / (qmax + 1/2)`
puts it at `v = qmax + 1/2`, while the negative extreme, at `qmin + 1/2`, trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .grid import dequantize, effective_scale_dtype, gradient_window, grouped, int_range, scaled_values
from .surrogates import FourierSurrogate, StraightThrough, Surrogate, as_surrogate


def stableqat_surrogate(v: torch.Tensor, amplitudes: Sequence[float]) -> torch.Tensor:
    """StableQAT's surrogate derivative of rounding, `g(v)`, in `v`'s dtype upcast to at least float32.

    All ones when `amplitudes` is empty (plain STE). See `FourierSurrogate`.

    Example:
        >>> round(stableqat_surrogate(torch.tensor([0.0]), [0.21]).item(), 6)
        0.034658
    """
    return as_surrogate(amplitudes)(v)


def lsq_gradient_scale(numel: int, bits: int) -> float:
    """LSQ's scale-gradient factor `1 / sqrt(numel(W) * (2**(bits-1) - 1))`."""
    return 1.0 / math.sqrt(numel * (2 ** (bits - 1) - 1))


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scales, bits, group_size, surrogate, window_dtype):
        qmin, qmax = int_range(bits)
        q = torch.round(scaled_values(weight, scales, group_size)).clamp_(qmin, qmax)
        ctx.save_for_backward(weight, scales)
        ctx.bits, ctx.group_size, ctx.surrogate, ctx.window_dtype = bits, group_size, surrogate, window_dtype
        return dequantize(q.reshape(weight.shape), scales, group_size, weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        weight, scales = ctx.saved_tensors
        v = scaled_values(weight, scales, ctx.group_size)
        low, high = gradient_window(ctx.bits, ctx.window_dtype)
        inside = (v >= low) & (v <= high)
        grad = grouped(grad_output.to(v.dtype), ctx.group_size)

        grad_weight = grad_scales = None
        if ctx.needs_input_grad[0]:
            surrogate_grad = grad if isinstance(ctx.surrogate, StraightThrough) else grad * ctx.surrogate(v)
            grad_weight = torch.where(inside, surrogate_grad, 0.0).reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            # Levels are recomputed, not stored. LSQ's rule: `round(v) - v` inside the unrounded range, the
            # clip level outside it (also for the group's absmax at qmax + 1/2, which the window lets through).
            qmin, qmax = int_range(ctx.bits)
            q = torch.round(v).clamp_(qmin, qmax)
            dwhat_ds = torch.where((v >= qmin) & (v <= qmax), q - v, q)
            factor = lsq_gradient_scale(weight.numel(), ctx.bits)
            grad_scales = ((grad * dwhat_ds).sum(dim=-1) * factor).to(scales.dtype)
        return grad_weight, grad_scales, None, None, None, None


def fake_quantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    surrogate: Surrogate | Sequence[float] | None = None,
    scale_dtype: str | torch.dtype | None = None,
) -> torch.Tensor:
    """Differentiable RTN fake quantization whose weight gradient goes through `surrogate`.

    `surrogate` is a `Surrogate`, StableQAT's Fourier amplitudes, or `None` / `()` for STE. Pass scales
    that require grad to learn them (LSQ); detached absmax scales get no gradient. `scale_dtype` is the
    dtype the scales were rounded to (`round_scales`): it widens the gradient window by its ulps.

    Example:
        >>> w = torch.tensor([[0.4, -0.15, 0.0625, 0.6, -0.55]], requires_grad=True)
        >>> fake_quantize(w, torch.tensor([[0.25]]), bits=3, group_size=-1, surrogate=[0.21])
        tensor([[ 0.5000, -0.2500,  0.0000,  0.5000, -0.5000]],
               grad_fn=<_FakeQuantizeBackward>)
    """
    window_dtype = effective_scale_dtype(scales.dtype, scale_dtype)
    return _FakeQuantize.apply(weight, scales, bits, group_size, as_surrogate(surrogate), window_dtype)


def ste_fake_quantize(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """RTN forward, straight-through backward (zero outside the clip range)."""
    return fake_quantize(weight, scales, bits, group_size, StraightThrough())


def stableqat_fake_quantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    amplitudes: Sequence[float] = (0.21,),
) -> torch.Tensor:
    """RTN forward, StableQAT's Fourier-surrogate backward (`amplitudes=()` is exactly STE)."""
    return fake_quantize(weight, scales, bits, group_size, FourierSurrogate(tuple(amplitudes)))
