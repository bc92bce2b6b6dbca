"""Stochastic-rounding fake quantization in Triton, with counter-based noise regenerated in the backward.

Reference: `hf_lotion.quant.fake_quant.stochastic_fake_quantize`. The uniform of element `i` (row-major
index) is `(tl.randint(seed, offset + i) >> 8) * 2**-24`, which `hf_lotion.quant.rounding` reproduces
bit for bit in PyTorch; so levels depend on `(seed, offset, i)` only, never on block sizes or devices,
and the backward recomputes them for the LSQ scale gradient instead of storing a noise tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.fake_quant import lsq_gradient_scale
from ..quant.grid import int_range
from ..quant.rounding import MAX_SEED
from .fake_quant import _blocks, _rows, cast_rne, column_chunk, fake_grads, grads_as_tensors, row_block


@triton.jit
def _stochastic_levels(w, s, idx, seed, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """`(v, q)`: `v = w / s` and its randomized rounding within `[QMIN, QMAX]`."""
    v = tl.div_rn(w, s)
    clamped = tl.minimum(tl.maximum(v, QMIN), QMAX)
    lower = tl.floor(clamped)
    u = (tl.randint(seed, idx) >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    return v, lower + tl.where(u < clamped - lower, 1.0, 0.0)


@triton.jit
def _stochastic_fwd_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    n_rows,
    group,
    seed,
    offset,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    _, row_mask, base, s = row_block(s_ptr, n_rows, group, BLOCK_R)
    for start in range(0, group, BLOCK_G):
        offs, mask = column_chunk(base, row_mask, group, start, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, q = _stochastic_levels(w, s, offs + offset, seed, QMIN, QMAX)
        tl.store(out_ptr + offs, cast_rne(q * s, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stochastic_bwd_kernel(
    w_ptr,
    s_ptr,
    dy_ptr,
    dw_ptr,
    ds_ptr,
    n_rows,
    group,
    seed,
    offset,
    lsq_factor,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    rows, row_mask, base, s = row_block(s_ptr, n_rows, group, BLOCK_R)
    ds_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, group, BLOCK_G):
        offs, mask = column_chunk(base, row_mask, group, start, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v, q = _stochastic_levels(w, s, offs + offset, seed, QMIN, QMAX)
        inside = (v >= QMIN) & (v <= QMAX)
        if NEED_DW:
            tl.store(dw_ptr + offs, cast_rne(tl.where(inside, dy, 0.0), dw_ptr.dtype.element_ty), mask=mask)
        if NEED_DS:
            ds_acc += tl.sum(tl.where(mask, dy * tl.where(inside, q - v, q), 0.0), axis=1)
    if NEED_DS:
        tl.store(ds_ptr + rows, cast_rne(ds_acc * lsq_factor, ds_ptr.dtype.element_ty), mask=row_mask)


def _check_seed(seed: int, offset: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed} is not supported; allowed: an integer in [0, 2**63 - 1].")
    if offset < 0:
        raise ValueError(f"offset={offset} is not supported; allowed: an integer >= 0.")


def stochastic_fake_quantize_forward(
    weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, seed: int, offset: int = 0
) -> torch.Tensor:
    """`s * RR(w / s)` in the weight's dtype, one pass, noise from `(seed, offset + index)`."""
    _check_seed(seed, offset)
    w, n_rows, group = _rows(weight, group_size)
    out = torch.empty_like(w)
    qmin, qmax = int_range(bits)
    block_r, block_g, programs = _blocks(n_rows, group)
    _stochastic_fwd_kernel[(programs,)](
        w,
        scales.contiguous(),
        out,
        n_rows,
        group,
        seed,
        offset,
        QMIN=qmin,
        QMAX=qmax,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
    )
    return out


def stochastic_fake_quantize_backward(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    seed: int,
    offset: int = 0,
    need_weight_grad: bool = True,
    need_scale_grad: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Straight-through weight gradient and LSQ scale gradient, regenerating the forward's levels."""
    w, n_rows, group = _rows(weight, group_size)
    scales = scales.contiguous()
    dw = torch.empty_like(w) if need_weight_grad else None
    ds = torch.empty_like(scales) if need_scale_grad else None
    qmin, qmax = int_range(bits)
    block_r, block_g, programs = _blocks(n_rows, group)
    _stochastic_bwd_kernel[(programs,)](
        w,
        scales,
        grad_output.contiguous(),
        w if dw is None else dw,
        scales if ds is None else ds,
        n_rows,
        group,
        seed,
        offset,
        lsq_gradient_scale(weight.numel(), bits),
        QMIN=qmin,
        QMAX=qmax,
        NEED_DW=need_weight_grad,
        NEED_DS=need_scale_grad,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
    )
    return dw, ds


@torch.library.custom_op("hf_lotion::stochastic_fake_quantize", mutates_args=())
def _stochastic_op(
    weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, seed: int, offset: int
) -> torch.Tensor:
    return stochastic_fake_quantize_forward(weight, scales, bits, group_size, seed, offset)


@_stochastic_op.register_fake
def _(weight, scales, bits, group_size, seed, offset):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("hf_lotion::stochastic_fake_quantize_backward", mutates_args=())
def _stochastic_backward_op(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    seed: int,
    offset: int,
    need_weight_grad: bool,
    need_scale_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dw, ds = stochastic_fake_quantize_backward(
        grad_output, weight, scales, bits, group_size, seed, offset, need_weight_grad, need_scale_grad
    )
    return grads_as_tensors(dw, ds, weight, scales)


@_stochastic_backward_op.register_fake
def _(grad_output, weight, scales, bits, group_size, seed, offset, need_weight_grad, need_scale_grad):
    return fake_grads(weight, scales, need_weight_grad, need_scale_grad)


def _setup_context(ctx, inputs, output):
    weight, scales, bits, group_size, seed, offset = inputs
    ctx.save_for_backward(weight, scales)
    ctx.bits, ctx.group_size, ctx.seed, ctx.offset = bits, group_size, seed, offset


def _backward(ctx, grad_output):
    weight, scales = ctx.saved_tensors
    need_dw, need_ds = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dw, ds = _stochastic_backward_op(
        grad_output, weight, scales, ctx.bits, ctx.group_size, ctx.seed, ctx.offset, need_dw, need_ds
    )
    return (dw if need_dw else None), (ds if need_ds else None), None, None, None, None


_stochastic_op.register_autograd(_backward, setup_context=_setup_context)


def stochastic_fake_quantize(
    weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, seed: int, offset: int = 0
) -> torch.Tensor:
    """Triton `hf_lotion.quant.stochastic_fake_quantize` (same levels for the same seed, bit for bit)."""
    _check_seed(int(seed), int(offset))
    return _stochastic_op(weight, scales, bits, group_size, int(seed), int(offset))
