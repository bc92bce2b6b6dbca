"""LOTION's penalty gradient in one Triton pass: `grad + m * c * G * s (1 - 2p)` and the penalty's value.

Reference: `hf_lotion.quant.lotion.add_penalty_grad`. Per weight, with `v = clamp(w / s, qmin, qmax) = n + p`:

* `out = grad + m * c * G * s * (1 - 2p)`, zero on grid points (`p = 0`), formed in fp32 and rounded once
  to the gradient's dtype; `c` is `lambda / 2` times the curvature's bias correction, `m` the gradient that
  reached the loss (read from a device scalar, so no host synchronisation);
* the penalty `c * sum G s^2 p (1 - p)`, reduced per program and summed on the host side.

One read of weight, gradient and curvature and one write, where the reference needs about a dozen
elementwise kernels and their temporaries. NaN and inf propagate as in the reference (`torch.clamp`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.grid import int_range
from .fake_quant import _blocks, _rows, cast_rne, clamp_nan, column_chunk, row_block


@triton.jit
def _lotion_penalty_grad_kernel(
    w_ptr,
    s_ptr,
    grad_ptr,
    curv_ptr,
    mult_ptr,
    out_ptr,
    partial_ptr,
    n_rows,
    group,
    coefficient,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    _, row_mask, base, s = row_block(s_ptr, n_rows, group, BLOCK_R)
    scale = tl.load(mult_ptr).to(tl.float32) * coefficient
    penalty = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, group, BLOCK_G):
        offs, mask = column_chunk(base, row_mask, group, start, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        curv = tl.load(curv_ptr + offs, mask=mask, other=0.0)
        v = clamp_nan(tl.div_rn(w, s), QMIN, QMAX)
        p = v - tl.floor(v)
        penalty += tl.sum(tl.where(mask, curv * (s * s * p * (1.0 - p)), 0.0), axis=1)
        slope = tl.where(p > 0, s * (1.0 - 2.0 * p), 0.0)
        tl.store(out_ptr + offs, cast_rne(grad + scale * (curv * slope), out_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(penalty, axis=0) * coefficient)


@torch.library.custom_op("hf_lotion::lotion_penalty_grad", mutates_args=())
def lotion_penalty_grad(
    weight: torch.Tensor,
    scales: torch.Tensor,
    grad: torch.Tensor,
    curvature: torch.Tensor,
    multiplier: torch.Tensor,
    bits: int,
    group_size: int,
    coefficient: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(grad + multiplier * coefficient * G * s (1 - 2p), coefficient * sum G s^2 p (1 - p))`.

    Args:
        curvature: fp32 `(out, in)`, the diagonal curvature `G` (or its raw EMA, with the bias correction
            folded into `coefficient`).
        multiplier: a one-element tensor on the weight's device.
    """
    assert curvature.dtype == torch.float32 and multiplier.numel() == 1
    w, n_rows, group = _rows(weight.detach(), group_size)
    block_r, block_g, programs = _blocks(n_rows, group)
    out = torch.empty_like(w, dtype=grad.dtype)
    partial = torch.empty(programs, device=w.device, dtype=torch.float32)
    qmin, qmax = int_range(bits)
    _lotion_penalty_grad_kernel[(programs,)](
        w,
        scales.detach().contiguous(),
        grad.contiguous(),
        curvature.contiguous(),
        multiplier.detach().reshape(1),
        out,
        partial,
        n_rows,
        group,
        coefficient,
        QMIN=qmin,
        QMAX=qmax,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
    )
    return out.view(weight.shape), partial.sum()


@lotion_penalty_grad.register_fake
def _(weight, scales, grad, curvature, multiplier, bits, group_size, coefficient):
    out = torch.empty(weight.shape, device=weight.device, dtype=grad.dtype)
    return out, weight.new_empty((), dtype=torch.float32)
