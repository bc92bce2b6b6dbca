"""Fused fake quantization in Triton: group absmax; round-to-nearest forward; STE/StableQAT backward with
LSQ scale grads.

Reference: `hf_lotion.quant.fake_quant` and `hf_lotion.quant.grid` (same arithmetic, element by element,
NaN and inf propagated as torch does). The weight `(out, in)` is viewed as `(out * n_groups, group)` rows, one scale per row. Each program owns
`BLOCK_R` whole rows and walks their columns in chunks of `BLOCK_G`, so per-row reductions (absmax, the
LSQ scale gradient) finish inside one program and need no atomics.

Bit-exactness with the reference: `v = w / s` uses the correctly rounded division `tl.div_rn` (Triton's
`/` is an approximate division on NVIDIA GPUs), rounding is half-to-even by the fp32 magic-number add,
and `q * s` is computed in fp32 and rounded once to the output dtype, as the reference does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..quant.fake_quant import lsq_gradient_scale
from ..quant.grid import SCALE_FLOOR_RATIO, gradient_window, int_range, scale_divisor
from ..quant.spec import SURROGATE_COEFF, resolve_group_size

_MAX_BLOCK_G = 1024
_BLOCK_ELEMENTS = 4096


@triton.jit
def round_half_even(x):
    """Round fp32 `x` (|x| < 2**22) to the nearest integer, ties to even, like `torch.round`.

    Adding and subtracting 1.5 * 2**23 leaves no fraction bits, and the fp32 add rounds half to even.
    """
    return (x + 12582912.0) - 12582912.0


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """Round fp32 `x` to `dtype`, to nearest with ties to even, exactly as torch's `.to(dtype)` does.

    bf16 is rounded on the bits (add 0x7FFF plus the lowest kept bit, drop the low half): Triton's
    interpreter truncates (or rounds ties away) instead, and this is correct on every backend.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    elif dtype == tl.float32:
        y = x
    else:
        y = x.to(dtype)
    return y


@triton.jit
def row_block(s_ptr, n_rows, group, BLOCK_R: tl.constexpr):
    """This program's rows (one scale each): `(rows, row_mask, row_base, s)`, `s` fp32 `(BLOCK_R, 1)`."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    s = tl.load(s_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)[:, None]
    return rows, row_mask, rows.to(tl.int64)[:, None] * group, s


@triton.jit
def column_chunk(row_base, row_mask, group, start, BLOCK_G: tl.constexpr):
    """Offsets and mask of columns `start .. start + BLOCK_G` of the program's rows."""
    cols = start + tl.arange(0, BLOCK_G)
    return row_base + cols[None, :], row_mask[:, None] & (cols < group)[None, :]


@triton.jit
def _group_absmax_kernel(w_ptr, out_ptr, n_rows, group, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    base = rows.to(tl.int64)[:, None] * group
    absmax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, group, BLOCK_G):
        offs, mask = column_chunk(base, row_mask, group, start, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # tl.max drops NaN; a group holding one must get a NaN absmax, as torch's amax gives.
        has_nan = tl.max((w != w).to(tl.int32), axis=1) > 0
        chunk = tl.where(has_nan, float("nan"), tl.max(tl.abs(w), axis=1))
        absmax = tl.maximum(absmax, chunk, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + rows, absmax, mask=row_mask)


@triton.jit
def clamp_nan(x, lo, hi):
    """`min(max(x, lo), hi)` that keeps NaN, as `torch.clamp` does (tl.minimum/maximum drop it by default)."""
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quant_levels(w, s, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """`(v, r, q)`: `v = w / s`, its nearest integer `r` (ties to even) and the level `q = clamp(r)`.

    `r` is exact for `|v| <= 2**22`; it is clamped to one past the range first, which keeps it exact and
    changes neither `q` nor `v - r` for any `v` the backward's window lets through.
    """
    v = tl.div_rn(w, s)
    r = round_half_even(clamp_nan(v, QMIN - 1.0, QMAX + 1.0))
    return v, r, clamp_nan(r, QMIN, QMAX)


@triton.jit
def _fake_quant_fwd_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    n_rows,
    group,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    _, row_mask, base, s = row_block(s_ptr, n_rows, group, BLOCK_R)
    for start in range(0, group, BLOCK_G):
        offs, mask = column_chunk(base, row_mask, group, start, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, _, q = quant_levels(w, s, QMIN, QMAX)
        tl.store(out_ptr + offs, cast_rne(q * s, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_bwd_kernel(
    w_ptr,
    s_ptr,
    dy_ptr,
    dw_ptr,
    ds_ptr,
    amp_ptr,
    n_rows,
    group,
    window_low,
    window_high,
    lsq_factor,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    N_TERMS: tl.constexpr,
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
        v, r, q = quant_levels(w, s, QMIN, QMAX)
        inside = (v >= window_low) & (v <= window_high)
        if NEED_DW:
            dw = dy
            if N_TERMS > 0:
                # StableQAT: g depends on v - round(v) only (unclamped: past qmax the window still admits).
                phase = 3.141592653589793 * (v - r)
                series = tl.zeros_like(phase)
                for k in tl.static_range(N_TERMS):
                    series += tl.load(amp_ptr + k) * tl.cos((2 * k + 1) * phase)
                cs = 4.442882938158366 * series
                dw = dy * tl.div_rn(1.0 - cs, 1.0 + cs)
            dw = tl.where(inside, dw, 0.0)
            tl.store(dw_ptr + offs, cast_rne(dw, dw_ptr.dtype.element_ty), mask=mask)
        if NEED_DS:
            # LSQ: round(v) - v inside the unrounded range, the (clamped) clip level outside it.
            in_range = (v >= QMIN) & (v <= QMAX)
            ds_acc += tl.sum(tl.where(mask, dy * tl.where(in_range, q - v, q), 0.0), axis=1)
    if NEED_DS:
        tl.store(ds_ptr + rows, cast_rne(ds_acc * lsq_factor, ds_ptr.dtype.element_ty), mask=row_mask)


# The kernel inlines pi and StableQAT's c = sqrt(2) pi as literals.
assert abs(4.442882938158366 - SURROGATE_COEFF) < 1e-15


def _blocks(n_rows: int, group: int) -> tuple[int, int, int]:
    """`(BLOCK_R, BLOCK_G, n_programs)`: about `_BLOCK_ELEMENTS` elements per program."""
    block_g = min(triton.next_power_of_2(group), _MAX_BLOCK_G)
    block_r = max(1, min(triton.next_power_of_2(n_rows), _BLOCK_ELEMENTS // block_g))
    return block_r, block_g, triton.cdiv(n_rows, block_r)


def _rows(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int, int]:
    """The weight as contiguous `(out * n_groups, group)` rows."""
    group = resolve_group_size(group_size, weight.shape[1])
    return weight.contiguous(), weight.numel() // group, group


@functools.cache
def _amplitudes_on(amplitudes: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """StableQAT's amplitudes as a device tensor, made once (not a host-to-device copy per backward)."""
    return torch.tensor(amplitudes or (0.0,), device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def group_absmax(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group `max |w|`, fp32 `(out, n_groups)`."""
    w, n_rows, group = _rows(weight, group_size)
    out = torch.empty(n_rows, device=w.device, dtype=torch.float32)
    block_r, block_g, programs = _blocks(n_rows, group)
    _group_absmax_kernel[(programs,)](w, out, n_rows, group, BLOCK_R=block_r, BLOCK_G=block_g)
    return out.view(weight.shape[0], -1)


def absmax_scales(
    weight: torch.Tensor, bits: int, group_size: int, grid: str = "full", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`hf_lotion.quant.absmax_scales` with the group reduction in one Triton pass (bit-identical)."""
    dtype = dtype or weight.dtype
    absmax = group_absmax(weight.detach(), group_size)
    # The floor is a fraction of the tensor's absmax, the largest group absmax (same value as the reference).
    floor = torch.clamp_min(absmax.amax() * SCALE_FLOOR_RATIO, torch.finfo(dtype).tiny)
    return torch.maximum(absmax / scale_divisor(bits, grid), floor).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Custom ops (launchers, opaque to torch.compile, with fake implementations) and autograd
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("hf_lotion::fake_quantize", mutates_args=())
def fake_quantize_op(
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    amplitudes: list[float],
    window_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`s * round(w / s)` (clamped to the range) in the weight's dtype, one fused pass.

    The backward is STE, or StableQAT's surrogate given `amplitudes`, plus LSQ scale gradients when the
    scales require grad. `window_dtype`: the precision of the scales, for the gradient window (None: the
    scales' dtype).
    """
    w, n_rows, group = _rows(weight, group_size)
    out = torch.empty_like(w)
    qmin, qmax = int_range(bits)
    block_r, block_g, programs = _blocks(n_rows, group)
    _fake_quant_fwd_kernel[(programs,)](
        w,
        scales.contiguous(),
        out,
        n_rows,
        group,
        QMIN=qmin,
        QMAX=qmax,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
    )
    return out


@fake_quantize_op.register_fake
def _(weight, scales, bits, group_size, amplitudes, window_dtype=None):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("hf_lotion::fake_quantize_backward", mutates_args=())
def fake_quantize_backward_op(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    amplitudes: list[float],
    window_dtype: torch.dtype | None,
    need_weight_grad: bool,
    need_scale_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and LSQ scale gradients in one pass; an empty tensor stands for one not requested."""
    w, n_rows, group = _rows(weight, group_size)
    scales = scales.contiguous()
    dw = torch.empty_like(w) if need_weight_grad else w.new_empty(0)
    ds = torch.empty_like(scales) if need_scale_grad else scales.new_empty(0)
    qmin, qmax = int_range(bits)
    window_low, window_high = gradient_window(bits, window_dtype or scales.dtype)
    block_r, block_g, programs = _blocks(n_rows, group)
    _fake_quant_bwd_kernel[(programs,)](
        w,
        scales,
        grad_output.contiguous(),
        dw if need_weight_grad else w,  # unused pointers when the grad is not needed
        ds if need_scale_grad else scales,
        _amplitudes_on(tuple(amplitudes), w.device),
        n_rows,
        group,
        window_low,
        window_high,
        lsq_gradient_scale(weight.numel(), bits),
        QMIN=qmin,
        QMAX=qmax,
        N_TERMS=len(amplitudes),
        NEED_DW=need_weight_grad,
        NEED_DS=need_scale_grad,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
    )
    return dw, ds


@fake_quantize_backward_op.register_fake
def _(
    grad_output, weight, scales, bits, group_size, amplitudes, window_dtype, need_weight_grad, need_scale_grad
):
    dw = (
        torch.empty_like(weight, memory_format=torch.contiguous_format)
        if need_weight_grad
        else weight.new_empty(0)
    )
    ds = (
        torch.empty_like(scales, memory_format=torch.contiguous_format)
        if need_scale_grad
        else scales.new_empty(0)
    )
    return dw, ds


def _setup_context(ctx, inputs, output):
    weight, scales, bits, group_size, amplitudes, window_dtype = inputs
    ctx.save_for_backward(weight, scales)
    ctx.args = (bits, group_size, amplitudes, window_dtype)


def _backward(ctx, grad_output):
    weight, scales = ctx.saved_tensors
    need_dw, need_ds = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dw, ds = fake_quantize_backward_op(grad_output, weight, scales, *ctx.args, need_dw, need_ds)
    return (dw if need_dw else None), (ds if need_ds else None), None, None, None, None


fake_quantize_op.register_autograd(_backward, setup_context=_setup_context)
