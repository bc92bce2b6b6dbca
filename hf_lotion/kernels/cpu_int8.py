"""Packed 8-bit weights with one scale per row on CPU through `aten._weight_int8pack_mm`.

Reference: `PackedLinear.dequantized_weight()` followed by `F.linear` (`hf_lotion.quant`).

The kernel takes the signed levels as int8 `(N, K)` (the same bytes as 8-bit packed words, so the copy
replaces them at no cost) and one scale per output row in the activations' dtype. It is vectorized for
bf16 only: fp32 and fp16 activations run scalar code that is slower than dequantize + `F.linear`
(benchmarks/packed_cpu.py), so only bf16 layers use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_int4 import run_kernel

KERNEL_DTYPES = (torch.bfloat16,)
# Largest input row count the kernel handles; above, dequantize once and call F.linear (measured crossover,
# benchmarks/RESULTS.md).
MAX_KERNEL_ROWS = {torch.bfloat16: 64}


def ops_available() -> bool:
    """Whether this torch build has the CPU int8 weight-only matmul."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


# torch 2.13's kernel returns garbage (1e29) for in_features 100 or 104: only multiples of 16 are used.
IN_FEATURES_MULTIPLE = 16


def supports(bits: int, n_groups: int, in_features: int, dtype: torch.dtype) -> bool:
    """8-bit layers with one scale per row, in a dtype the kernel is fast for."""
    return (
        ops_available()
        and bits == 8
        and n_groups == 1
        and in_features % IN_FEATURES_MULTIPLE == 0
        and dtype in KERNEL_DTYPES
    )


def max_kernel_rows(dtype: torch.dtype) -> int:
    return MAX_KERNEL_ROWS.get(dtype, 0)


def int8_mm(x: torch.Tensor, levels: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """The kernel itself: `x (M, K) @ (s * q).T`, `row_scales` `(N,)`."""
    return torch.ops.aten._weight_int8pack_mm(x, levels, row_scales)


def int8_linear(
    x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`F.linear(x, s * q, bias)`: the kernel for up to `max_kernel_rows` rows, dequantize + `F.linear` above.

    `x` is CPU, in the scales' dtype; `scales` `(N, 1)` (the caller checks).
    """
    in_features = levels.shape[1]
    rows = x.numel() // in_features
    if rows > max_kernel_rows(x.dtype):
        return F.linear(x, dequantize_int8(levels, scales), bias)
    macs = rows * in_features * levels.shape[0]
    out = run_kernel(
        int8_mm, macs, x.reshape(rows, in_features).contiguous(), levels, scales.reshape(-1).contiguous()
    )
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def dequantize_int8(levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`s * q` in the scales' dtype, bit-identical to `hf_lotion.quant.dequantize` (one scale per row)."""
    from ..quant.grid import dequantize

    return dequantize(levels, scales.contiguous(), -1, scales.dtype)
