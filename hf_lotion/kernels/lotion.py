"""LOTION's regulariser step in one Triton pass: curvature EMA, penalty value and gradient, added in place.

Reference: `hf_lotion.quant.lotion.lotion_penalty_and_grad` plus `FisherCurvature.observe` in the trainer.
Per weight, with `v = clamp(w / s, qmin, qmax) = n + p`:

* empirical-Fisher mode: `ema <- beta * ema + (1 - beta) * factor * grad**2` from the *loss* gradient
  (read before anything is added to it), then `G = ema * bias_correction`; otherwise `G` is given;
* `grad += (lambda / 2) * G * s * (1 - 2p)` (zero on grid points), times the fp16 loss scale if any;
* the penalty `(lambda / 2) * sum G s^2 p (1 - p)`, reduced per program and summed on the host side.

One read of weight, gradient and curvature and one write of gradient and curvature, where the reference
needs about a dozen elementwise kernels and their temporaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.grid import int_range
from .fake_quant import _blocks, _rows, cast_rne, column_chunk, row_block


@triton.jit
def _lotion_step_kernel(
    w_ptr,
    s_ptr,
    grad_ptr,
    curv_ptr,
    partial_ptr,
    n_rows,
    group,
    half_strength,
    grad_scale,
    ema_beta,
    ema_factor,
    bias_correction,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    FISHER: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    _, row_mask, base, s = row_block(s_ptr, n_rows, group, BLOCK_R)
    penalty = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, group, BLOCK_G):
        offs, mask = column_chunk(base, row_mask, group, start, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        curv = tl.load(curv_ptr + offs, mask=mask, other=0.0)
        if FISHER:
            curv = curv * ema_beta + (1.0 - ema_beta) * (grad * grad * ema_factor)
            tl.store(curv_ptr + offs, curv, mask=mask)
            curv = curv * bias_correction
        v = tl.minimum(tl.maximum(tl.div_rn(w, s), QMIN), QMAX)
        p = v - tl.floor(v)
        penalty += tl.sum(tl.where(mask, curv * (s * s * p * (1.0 - p)), 0.0), axis=1)
        slope = tl.where(p > 0, s * (1.0 - 2.0 * p), 0.0)
        # Rounded to the weight's dtype first, as the reference adds a weight-dtype tensor to the grad.
        reg = cast_rne(half_strength * curv * slope, w_ptr.dtype.element_ty).to(tl.float32)
        if SCALED:
            reg = cast_rne(reg * grad_scale, w_ptr.dtype.element_ty).to(tl.float32)
        tl.store(grad_ptr + offs, cast_rne(grad + reg, grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(penalty, axis=0) * half_strength)


@torch.library.custom_op("hf_lotion::lotion_step_", mutates_args=("grad", "curvature"))
def lotion_step_(
    weight: torch.Tensor,
    scales: torch.Tensor,
    grad: torch.Tensor,
    curvature: torch.Tensor,
    bits: int,
    group_size: int,
    strength: float,
    grad_scale: float,
    fisher: list[float],
) -> torch.Tensor:
    """Add LOTION's regulariser gradient into `grad` in place and return the penalty (fp32 scalar).

    Args:
        curvature: fp32 `(out, in)`: the diagonal curvature `G`, or, with `fisher`, the EMA state that is
            updated in place from `grad` before `grad` is changed.
        fisher: `[beta, factor, bias_correction]`: fold `factor * grad**2` into the EMA with decay `beta`
            and use `G = ema * bias_correction`; empty to read `G` as given.
    """
    assert grad.is_contiguous() and curvature.is_contiguous() and curvature.dtype == torch.float32
    w, n_rows, group = _rows(weight.detach(), group_size)
    block_r, block_g, programs = _blocks(n_rows, group)
    partial = torch.empty(programs, device=w.device, dtype=torch.float32)
    beta, factor, correction = fisher or (0.0, 0.0, 1.0)
    qmin, qmax = int_range(bits)
    _lotion_step_kernel[(programs,)](
        w,
        scales.detach().contiguous(),
        grad,
        curvature,
        partial,
        n_rows,
        group,
        0.5 * strength,
        grad_scale,
        beta,
        factor,
        correction,
        QMIN=qmin,
        QMAX=qmax,
        FISHER=bool(fisher),
        SCALED=grad_scale != 1.0,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
    )
    return partial.sum()


@lotion_step_.register_fake
def _(weight, scales, grad, curvature, bits, group_size, strength, grad_scale, fisher):
    return weight.new_empty((), dtype=torch.float32)
