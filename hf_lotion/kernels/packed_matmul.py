"""Packed low-bit linear in Triton: a GEMV for decode-sized batches, dequantize + cuBLAS for the rest.

Reference: `PackedLinear.dequantized_weight()` followed by `F.linear` (`hf_lotion.quant.packing` and
`hf_lotion.quant.grid.dequantize`). Packed rows are compressed-tensors' little-endian bit streams of
`q + 2**(bits-1)` in int32 words.

* `dequantize_packed`: one pass writes `s * q` in the scales' dtype, bit-identical to the reference
  (any width; 3-bit values that straddle two words are read as one 64-bit window).
* `packed_gemv`: for `M <= GEMV_MAX_M` rows and 2/4/8 bits, each program unpacks a `(BLOCK_N, BLOCK_K)`
  weight tile from whole words in registers (one load per word, one shift per slot), rounds `s * q` to
  the activation dtype exactly as the reference weight, and accumulates `x * w` in fp32. The K loop is
  split over `SPLIT_K` programs (partial sums, reduced on the host side, deterministic) so a narrow
  output still fills the GPU. Low-bit weights are read once: the point of packing at decode time.
* Larger batches are compute-bound: dequantize once into a temporary and call `F.linear` (cuBLAS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..quant.packing import packed_words
from ..quant.spec import resolve_group_size
from .fake_quant import cast_rne

# Rows handled by the GEMV; beyond this, dequantize + cuBLAS (tensor cores) wins.
GEMV_MAX_M = 8
GEMV_BITS = (2, 4, 8)
_BLOCK_N = 32
_BLOCK_K = 128
# Aim for this many programs so that small N still occupies every SM (split-K).
_TARGET_PROGRAMS = 512


@triton.jit
def _unpack_levels(packed_ptr, rows, row_mask, words_per_row, k0, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Signed levels of columns `k0 .. k0 + BLOCK_K` of `rows`, fp32 `(BLOCK_ROWS, BLOCK_K)`."""
    row_base = rows.to(tl.int64)[:, None] * words_per_row
    if 32 % BITS == 0:
        # Whole words: load each once and shift every slot out of it; element k = word * PER_WORD + slot.
        PER_WORD: tl.constexpr = 32 // BITS
        BLOCK_W: tl.constexpr = BLOCK_K // PER_WORD
        word = k0 // PER_WORD + tl.arange(0, BLOCK_W)
        mask = row_mask[:, None] & (word < words_per_row)[None, :]
        words = tl.load(packed_ptr + row_base + word[None, :], mask=mask, other=0)
        shifts = tl.arange(0, PER_WORD) * BITS
        # Arithmetic shifts smear the sign bit of negative words; the mask keeps only the slot's bits.
        u = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        u = tl.reshape(u, (words.shape[0], BLOCK_K))
    else:
        # Values may straddle two words: read the 64-bit window starting at the value's word.
        start = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64) * BITS
        word = start // 32
        mask = row_mask[:, None] & (word < words_per_row)[None, :]
        low = tl.load(packed_ptr + row_base + word[None, :], mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
        high_mask = row_mask[:, None] & (word + 1 < words_per_row)[None, :]
        high = (
            tl.load(packed_ptr + row_base + word[None, :] + 1, mask=high_mask, other=0).to(tl.int64)
            & 0xFFFFFFFF
        )
        u = ((low | (high << 32)) >> (start % 32)[None, :]) & ((1 << BITS) - 1)
    return (u - (1 << (BITS - 1))).to(tl.float32)


@triton.jit
def _dequantize_kernel(
    packed_ptr,
    s_ptr,
    out_ptr,
    N,
    K,
    words_per_row,
    group,
    n_groups,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < K)[None, :]
    q = _unpack_levels(packed_ptr, rows, row_mask, words_per_row, tl.program_id(1) * BLOCK_K, BITS, BLOCK_K)
    s_offs = rows.to(tl.int64)[:, None] * n_groups + (cols // group)[None, :]
    s = tl.load(s_ptr + s_offs, mask=mask, other=0.0).to(tl.float32)
    out_offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(out_ptr + out_offs, cast_rne(q * s, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _packed_gemv_kernel(
    x_ptr,
    packed_ptr,
    s_ptr,
    partial_ptr,
    M,
    N,
    K,
    words_per_row,
    group,
    n_groups,
    k_per_split,
    BITS: tl.constexpr,
    SCALE_PER_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        q = _unpack_levels(packed_ptr, rows, row_mask, words_per_row, k0, BITS, BLOCK_K)
        if SCALE_PER_CHUNK:
            # The chunk lies inside one group: one scale per row, broadcast (g128 and per-row layouts).
            s = tl.load(s_ptr + rows.to(tl.int64) * n_groups + k0 // group, mask=row_mask, other=0.0)
            s = s.to(tl.float32)[:, None]
        else:
            s_offs = rows.to(tl.int64)[:, None] * n_groups + (cols // group)[None, :]
            s = tl.load(s_ptr + s_offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        # The reference multiplies by the weight rounded to the activation dtype: round the same way.
        w = cast_rne(q * s, x_ptr.dtype.element_ty).to(tl.float32)
        x = tl.load(x_ptr + m.to(tl.int64) * K + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    out_offs = (pid_k * M + m).to(tl.int64) * N + rows
    tl.store(partial_ptr + out_offs, tl.sum(acc, axis=1), mask=row_mask)


def _check_packed(packed: torch.Tensor, scales: torch.Tensor, bits: int, in_features: int) -> None:
    assert packed.dtype == torch.int32 and packed.shape[1] == packed_words(in_features, bits)
    assert scales.shape[0] == packed.shape[0]


def dequantize_packed(
    packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    """`s * q` as `(out, in)` in the scales' dtype, bit-identical to `PackedLinear.dequantized_weight()`."""
    _check_packed(packed, scales, bits, in_features)
    n = packed.shape[0]
    group = resolve_group_size(group_size, in_features)
    out = torch.empty(n, in_features, device=packed.device, dtype=scales.dtype)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(in_features, _BLOCK_K))
    _dequantize_kernel[grid](
        packed.contiguous(),
        scales.contiguous(),
        out,
        n,
        in_features,
        packed.shape[1],
        group,
        scales.shape[1],
        BITS=bits,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return out


def packed_gemv(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    """`x @ (s * q).T` for a 2-D `x` of few rows, fp32 result `(M, N)` (bias and the cast are the caller's)."""
    _check_packed(packed, scales, bits, in_features)
    assert bits in GEMV_BITS, f"packed_gemv takes bits in {GEMV_BITS}, got {bits}"
    m, n = x.shape[0], packed.shape[0]
    group = resolve_group_size(group_size, in_features)
    n_blocks = triton.cdiv(n, _BLOCK_N)
    k_blocks = triton.cdiv(in_features, _BLOCK_K)
    split_k = max(1, min(k_blocks, _TARGET_PROGRAMS // max(1, n_blocks * m)))
    k_per_split = triton.cdiv(k_blocks, split_k) * _BLOCK_K
    split_k = triton.cdiv(in_features, k_per_split)
    partial = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    _packed_gemv_kernel[(n_blocks, m, split_k)](
        x.contiguous(),
        packed.contiguous(),
        scales.contiguous(),
        partial,
        m,
        n,
        in_features,
        packed.shape[1],
        group,
        scales.shape[1],
        k_per_split,
        BITS=bits,
        SCALE_PER_CHUNK=group % _BLOCK_K == 0,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return partial.sum(dim=0)


@torch.library.custom_op("hf_lotion::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """`F.linear(x, s * q, bias)` from packed weights: GEMV for up to `GEMV_MAX_M` rows, else dequant + cuBLAS."""
    rows = x.reshape(-1, in_features)
    if rows.shape[0] <= GEMV_MAX_M and bits in GEMV_BITS:
        out = packed_gemv(rows, packed, scales, bits, group_size, in_features)
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])
    weight = dequantize_packed(packed, scales, bits, group_size, in_features)
    return F.linear(x, weight, bias)


@packed_linear.register_fake
def _(x, packed, scales, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _setup_context(ctx, inputs, output):
    _x, packed, scales, _bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(packed, scales)
    ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, in_features


def _backward(ctx, grad_output):
    # Frozen packed weights: only the input (and a trainable bias, e.g. under adapters) get gradients.
    packed, scales = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_packed(packed, scales, ctx.bits, ctx.group_size, ctx.in_features)
        grad_x = grad_output @ weight
    if ctx.needs_input_grad[3]:
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias, None, None, None


packed_linear.register_autograd(_backward, setup_context=_setup_context)
