"""Packed 2/3/4-bit weights on CPU through PyTorch's int4 kernels (`aten._weight_int4pack_mm_for_cpu`).

Reference: `PackedLinear.dequantized_weight()` followed by `F.linear` (`hf_lotion.quant`).

PyTorch's CPU kernel takes the weight as unsigned nibbles `u = q + 8` in its own blocked layout (made by
`aten._convert_weight_to_int4pack_for_cpu`) and `scales_and_zeros` of shape `(K / group, N, 2)` in the
activations' dtype, and computes with `(u - 8) * scale + zero`. A symmetric level `q` in `[-8, 7]` is
`u = q + 8` with zero 0, so hf_lotion's 2-, 3- and 4-bit grids all run on it unchanged.

* `to_int4pack`: the kernel-ready copy of a layer (levels and scales), made once per layer.
* `from_int4pack`: its inverse (the signed levels), so the copy can replace the packed words: saving,
  re-quantizing and the reference path read the levels back from it. The nibble layout depends on the
  CPU's vector width (64-row blocks with AVX-512, 32 otherwise), so it is probed from PyTorch's own
  converter once per row count, and every conversion is checked against its inverse.
* `int4_linear`: the matmul; inputs with more than `max_kernel_rows(dtype)` rows dequantize once and call
  `F.linear` instead, which is faster there (crossover measured in benchmarks/packed_cpu.py).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

# What the kernel accepts (torch 2.4 - 2.13).
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
KERNEL_BITS = (2, 3, 4)
ROWS_MULTIPLE = 16
_OFFSET = 8
# Largest input row count (tokens) that the kernel handles; larger inputs dequantize once and call F.linear.
# Measured on a 2-core AVX-512 machine (benchmarks/packed_cpu.py, crossover table in benchmarks/RESULTS.md):
# the kernel's bf16 path is vectorized; its fp32 path is scalar and pays off for single rows only; its fp16
# path is scalar too and lost to dequantize + F.linear even there (0: fp16 layers keep packed words).
MAX_KERNEL_ROWS = {torch.bfloat16: 128, torch.float16: 0, torch.float32: 1}


# With OMP_WAIT_POLICY=PASSIVE (which 2-core machines need: spinning threads made runs several times slower),
# OpenMP's threads sleep between parallel regions and every region pays their wake-up, about 45 us on a
# 2-core AVX-512 machine: 4x what a 576x576 decode product takes on one thread. Products of up to
# SINGLE_THREAD_MAX_MACS multiply-adds run on one thread there (measured crossover 4-8M; with the default
# policy the threads spin, wake at once, and one thread would be 10-18% slower, so nothing changes).
# Only the vectorized (bf16) kernels: the scalar fp32/fp16 code is compute-bound and needs both threads.
THREADS_SLEEP = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
SINGLE_THREAD_MAX_MACS = 1 << 23
SINGLE_THREAD_DTYPES = (torch.bfloat16,)


def run_kernel(kernel, macs: int, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """`kernel(x, *args)`, on one thread when the product is small and idle threads sleep (see above)."""
    threads = torch.get_num_threads()
    small = macs <= SINGLE_THREAD_MAX_MACS and x.dtype in SINGLE_THREAD_DTYPES
    if not (THREADS_SLEEP and small) or threads == 1:
        return kernel(x, *args)
    torch.set_num_threads(1)
    try:
        return kernel(x, *args)
    finally:
        torch.set_num_threads(threads)


def ops_available() -> bool:
    """Whether this torch build has the CPU int4 ops (torch >= 2.5)."""
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        aten, "_convert_weight_to_int4pack_for_cpu"
    )


def kernel_group_size(group_size: int, in_features: int) -> int | None:
    """The kernel's group size for a layer, or None where the kernel cannot hold its scales exactly.

    A group size the kernel takes is used as is; per-row scales (`-1`) repeat into the largest kernel group
    that divides `in_features` (the same scale in every group of the row: exact).
    """
    if group_size == -1:
        return next((g for g in KERNEL_GROUP_SIZES if in_features % g == 0), None)
    return group_size if group_size in KERNEL_GROUP_SIZES and in_features % group_size == 0 else None


def supports(bits: int, group_size: int, in_features: int, out_features: int) -> bool:
    """Whether a packed layer of this shape and grid can run on the CPU int4 kernel."""
    return (
        ops_available()
        and bits in KERNEL_BITS
        and out_features % ROWS_MULTIPLE == 0
        and kernel_group_size(group_size, in_features) is not None
    )


def kernel_scales_and_zeros(scales: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """`(K / kernel_group, N, 2)`: the layer's scales (repeated for per-row scales) and zeros, contiguous."""
    kernel_group = kernel_group_size(group_size, in_features)
    assert kernel_group is not None, "caller checks supports() first"
    groups = in_features // kernel_group
    expanded = scales.expand(-1, groups) if scales.shape[1] == 1 else scales
    out = torch.zeros(groups, scales.shape[0], 2, dtype=scales.dtype, device=scales.device)
    out[..., 0] = expanded.t()
    return out


@functools.lru_cache(maxsize=64)
def _block_layout(rows: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(block, position, tail_position) of the converter's layout for `rows` rows.

    The converter stores rows in blocks of `block` rows; within a block, for each input column, the block's
    nibbles follow one another. Reading a column's bytes as all low nibbles, then all high nibbles,
    `position[i]` is the row (within a full block) at position `i`, the same for every full block, and
    `tail_position` the same for the last, shorter block. Either is None where it is the identity (the
    vectorized layouts, where byte `j` holds rows `j` and `j + block / 2`). Probed from the converter on a
    2-column tensor whose values spell out the row index.
    """
    index = torch.arange(rows, dtype=torch.int32)
    source = torch.zeros(2 * rows, dtype=torch.int64)
    for shift in range(0, max(rows - 1, 1).bit_length(), 4):
        digit = ((index >> shift) & 15).unsqueeze(1).expand(rows, 2).contiguous()
        source |= _interleaved_nibbles(_convert(digit).flatten()).to(torch.int64) << shift
    column = _interleaved_nibbles(
        _convert(torch.arange(2, dtype=torch.int32).expand(rows, 2).contiguous()).flatten()
    )
    # Block 0's column-0 nibbles come first: their count is the block size (or all rows when fewer).
    block = int((column == 1).nonzero()[0]) if bool((column == 1).any()) else rows

    def rows_by_position(start: int) -> torch.Tensor | None:
        in_block = min(block, rows - start)
        interleaved = source[2 * start : 2 * start + in_block] - start  # low, high, low, high, ...
        halves = torch.cat([interleaved[0::2], interleaved[1::2]])  # all low nibbles, then all high
        return None if torch.equal(halves, torch.arange(in_block)) else halves

    full = rows - rows % block
    position = rows_by_position(0) if full else None
    for start in range(block, full, block):
        later = rows_by_position(start)
        if (later is None) != (position is None) or (later is not None and not torch.equal(later, position)):
            raise RuntimeError("aten._convert_weight_to_int4pack_for_cpu lays out blocks differently")
    return block, position, rows_by_position(full) if rows % block else None


def _convert(unsigned: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)


def _interleaved_nibbles(bytes_: torch.Tensor) -> torch.Tensor:
    """Low and high nibble of each byte, in that order (`(..., 2n)` uint8 for `(..., n)`)."""
    return torch.stack([bytes_ & 15, bytes_ >> 4], dim=-1).flatten(-2)


def _unsigned_levels(packed: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """`q + 8` as uint8 `(rows, columns)` from the converter's copy."""
    block, position, tail_position = _block_layout(rows)
    flat = packed.reshape(-1)
    full = rows - rows % block

    def by_row(bytes_: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        # bytes_ (blocks, K, block / 2) -> nibbles (blocks, K, block) in row order -> (blocks * block, K).
        nibbles = torch.cat([bytes_ & 15, bytes_ >> 4], dim=-1)
        if order is not None:
            nibbles = nibbles.index_select(2, torch.argsort(order).to(packed.device))
        # Contiguous (row-major) like the reference's levels: the layout decides F.linear's blas path.
        return nibbles.transpose(1, 2).reshape(-1, columns).contiguous()

    pieces = []
    if full:
        pieces.append(by_row(flat[: full * columns // 2].view(full // block, columns, block // 2), position))
    if rows % block:
        tail = flat[full * columns // 2 :].view(1, columns, (rows - full) // 2)
        pieces.append(by_row(tail, tail_position))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def to_int4pack(levels: torch.Tensor) -> torch.Tensor:
    """The converter's uint8 `(N, K / 2)` copy of signed levels `(N, K)` (each in `[-8, 7]`), checked.

    Raises `RuntimeError` if the converter's layout is not the one `from_int4pack` reads (a torch build
    whose layout differs): callers keep the reference path then.
    """
    packed = _convert((levels.to(torch.int32) + _OFFSET).contiguous())
    if not torch.equal(from_int4pack(packed, *levels.shape), levels.to(torch.int8)):
        raise RuntimeError(
            "aten._convert_weight_to_int4pack_for_cpu wrote a layout hf_lotion cannot read back"
        )
    return packed


def from_int4pack(packed: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Signed levels int8 `(rows, columns)` from the converter's uint8 `(rows, columns / 2)` copy."""
    return _unsigned_levels(packed, rows, columns).to(torch.int8) - _OFFSET


def dequantize_int4pack(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int
) -> torch.Tensor:
    """`s * q` `(out, in)` in the scales' dtype, bit-identical to `hf_lotion.quant.dequantize` of the levels:
    `q` is exact in float32 and the product is rounded once, as there.
    """
    from ..quant.grid import grouped, math_dtype

    math = math_dtype(scales)
    levels = _unsigned_levels(packed, scales.shape[0], in_features).to(math) - _OFFSET
    # Contiguous scales (the layer's are a strided view of the kernel's): the product's layout, and so the
    # blas path F.linear takes, must be the reference's.
    factors = scales.to(math).contiguous()
    return (grouped(levels, group_size) * factors.unsqueeze(-1)).reshape(levels.shape).to(scales.dtype)


def max_kernel_rows(dtype: torch.dtype) -> int:
    return MAX_KERNEL_ROWS.get(dtype, 0)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The kernel itself: `x (M, K) @ (s * q).T` from the converter's copy."""
    kernel_group = x.shape[-1] // scales_and_zeros.shape[0]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, kernel_group, scales_and_zeros)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """`F.linear(x, s * q, bias)` from the kernel-ready copy: the kernel for up to `max_kernel_rows` rows,
    dequantize + `F.linear` above. `x` is CPU, in the scales' dtype (the caller checks).
    """
    rows = x.numel() // in_features
    if rows > max_kernel_rows(x.dtype):
        return F.linear(x, dequantize_int4pack(packed, scales, group_size, in_features), bias)
    macs = rows * in_features * scales_and_zeros.shape[1]
    out = run_kernel(int4_mm, macs, x.reshape(rows, in_features).contiguous(), packed, scales_and_zeros)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias
