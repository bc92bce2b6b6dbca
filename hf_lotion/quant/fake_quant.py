"""Fake quantization with straight-through (STE) and StableQAT surrogate gradients, plus LSQ scale gradients.

Forward: `w_hat = s * clamp(round(w / s), qmin, qmax)` (RTN, identical to the deploy weight).
Backward, with `v = w / s`:

* weight: `dL/dw = dL/dw_hat * 1[qmin <= v <= qmax] * g(v)`, with `g` a `Surrogate`: `g = 1` for STE;
  StableQAT's Fourier surrogate `g(v) = (1 - c S) / (1 + c S)`, `S = sum_k a_k cos((2k+1) pi (v + round(v)))`,
  `c = sqrt(2) pi`, which is 1 at `v - round(v) = +-1/2` and about 0.0347 on the grid for `a = [0.21]`.
* scale (only when the scale requires grad, LSQ): per element `round(v) - v` inside the range and the
  clip level outside, times `1 / sqrt(numel(W) * qmax)`, summed over each group. No surrogate here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .grid import dequantize, grouped, int_range, scaled_values
from .rounding import stochastic_round
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


def _levels(v: torch.Tensor, bits: int, seed: int | None, offset: int) -> torch.Tensor:
    """Integer levels of `v = w / s` in the clip range: round to nearest, or randomized rounding under `seed`."""
    qmin, qmax = int_range(bits)
    if seed is None:
        return torch.round(v).clamp_(qmin, qmax)
    return stochastic_round(v, qmin, qmax, seed=seed, offset=offset)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scales, bits, group_size, surrogate, seed, offset):
        q = _levels(scaled_values(weight, scales, group_size), bits, seed, offset)
        ctx.save_for_backward(weight, scales)
        ctx.bits, ctx.group_size, ctx.surrogate = bits, group_size, surrogate
        ctx.seed, ctx.offset = seed, offset
        return dequantize(q.reshape(weight.shape), scales, group_size, weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        weight, scales = ctx.saved_tensors
        qmin, qmax = int_range(ctx.bits)
        v = scaled_values(weight, scales, ctx.group_size)
        inside = (v >= qmin) & (v <= qmax)
        grad = grouped(grad_output.to(v.dtype), ctx.group_size)

        grad_weight = grad_scales = None
        if ctx.needs_input_grad[0]:
            surrogate_grad = grad if isinstance(ctx.surrogate, StraightThrough) else grad * ctx.surrogate(v)
            grad_weight = torch.where(inside, surrogate_grad, 0.0).reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            # Levels are recomputed (randomized ones regenerated from the seed), not stored. Outside the
            # range the clamped level is the clip level LSQ differentiates by.
            q = _levels(v, ctx.bits, ctx.seed, ctx.offset)
            dwhat_ds = torch.where(inside, q - v, q)
            factor = lsq_gradient_scale(weight.numel(), ctx.bits)
            grad_scales = ((grad * dwhat_ds).sum(dim=-1) * factor).to(scales.dtype)
        return grad_weight, grad_scales, None, None, None, None, None


def fake_quantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    surrogate: Surrogate | Sequence[float] | None = None,
) -> torch.Tensor:
    """Differentiable RTN fake quantization whose weight gradient goes through `surrogate`.

    `surrogate` is a `Surrogate`, StableQAT's Fourier amplitudes, or `None` / `()` for STE. Pass scales
    that require grad to learn them (LSQ); detached absmax scales get no gradient.

    Example:
        >>> w = torch.tensor([[0.4, -0.15, 0.0625, 0.6, -0.55]], requires_grad=True)
        >>> fake_quantize(w, torch.tensor([[0.25]]), bits=3, group_size=-1, surrogate=[0.21])
        tensor([[ 0.5000, -0.2500,  0.0000,  0.5000, -0.5000]],
               grad_fn=<_FakeQuantizeBackward>)
    """
    return _FakeQuantize.apply(weight, scales, bits, group_size, as_surrogate(surrogate), None, 0)


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


def stochastic_fake_quantize(
    weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, seed: int, offset: int = 0
) -> torch.Tensor:
    """`s * RR(w / s)`: fake quantization with unbiased randomized rounding, straight-through backward.

    The noise is a function of `(seed, offset + element index)` only (Philox, as in the Triton kernel), so
    the forward is reproducible on any device and the backward regenerates the levels for the LSQ scale
    gradient instead of storing them. Use a new `seed` (or `offset`) per step for fresh noise.

    Example:
        >>> w = torch.tensor([[0.23, -0.05, 0.4]])
        >>> stochastic_fake_quantize(w, torch.tensor([[0.1]]), bits=4, group_size=-1, seed=3)
        tensor([[0.2000, 0.0000, 0.4000]])
    """
    return _FakeQuantize.apply(weight, scales, bits, group_size, StraightThrough(), int(seed), int(offset))
