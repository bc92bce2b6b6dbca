"""Fast paths: Triton kernels on CUDA, the plain-PyTorch reference (`hf_lotion.quant`) everywhere else.

Every function here has the signature and the results of its reference and dispatches per call (see
`dispatch`): Triton when `use_triton(tensor)` says so and the dtype is one the kernels handle (fp32,
bf16, fp16; float64 always takes the reference), else the reference. Kernel modules import triton, so
they are imported only when a kernel is about to run.

One file per op (kernels, custom ops that launch them with fake implementations, autograd):

* `fake_quant`: group absmax; fused round-to-nearest fake-quant forward; Fourier-surrogate backward
  (STE, StableQAT) with LSQ scale grads;
* `lotion`: LOTION's penalty gradient and value in one pass;
* `packed_matmul`: packed int2/3/4/8 dequantization, GEMV for decode, dequantize + cuBLAS for batches.
* `cpu_int4`, `cpu_int8`: PyTorch's own CPU kernels for packed 2/3/4-bit layers and bf16 8-bit per-row
  layers (no triton needed; see `PackedLinear.prepare_cpu_kernel_`).

Set `HF_LOTION_KERNELS=reference` to force the reference everywhere (debugging).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import quant
from ..quant.surrogates import Surrogate
from . import cpu_int4, cpu_int8
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    interpreter_enabled,
    kernel_backend,
    requested_backend,
    triton_can_run,
    use_triton,
)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_for(*tensors: torch.Tensor) -> bool:
    """Triton for these tensors: the backend allows it and every dtype is one the kernels handle."""
    return all(t.dtype in KERNEL_DTYPES for t in tensors) and use_triton(tensors[0])


def absmax_scales(
    weight: torch.Tensor, bits: int, group_size: int, grid: str = "full", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-group absmax scales; bit-identical to `hf_lotion.quant.absmax_scales`."""
    if _triton_for(weight):
        from . import fake_quant

        return fake_quant.absmax_scales(weight, bits, group_size, grid, dtype)
    return quant.absmax_scales(weight, bits, group_size, grid, dtype)


def fake_quantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    surrogate: Surrogate | Sequence[float] | None = None,
    scale_dtype: str | torch.dtype | None = None,
) -> torch.Tensor:
    """RTN fake quantization whose backward goes through `surrogate`, with LSQ scale gradients.

    `scale_dtype`: what the scales were rounded to (`QuantSpec.scale_dtype`), for the gradient window.

    `surrogate`: a `hf_lotion.quant.Surrogate`, StableQAT's Fourier amplitudes, or `None` / `()` for STE.
    The Triton kernel evaluates Fourier-series surrogates (STE included); any other surrogate runs its
    reference on every device. Forward outputs are bit-identical to `hf_lotion.quant.fake_quantize`;
    gradients agree to rounding.

    Example:
        >>> w = torch.tensor([[0.4, -0.15, 0.0625, 0.6, -0.55]])
        >>> fake_quantize(w, torch.tensor([[0.25]]), bits=3, group_size=-1)
        tensor([[ 0.5000, -0.2500,  0.0000,  0.5000, -0.5000]])
    """
    surrogate = quant.as_surrogate(surrogate)
    amplitudes = surrogate.kernel_amplitudes
    if amplitudes is not None and _triton_for(weight, scales):
        from . import fake_quant

        window = quant.effective_scale_dtype(scales.dtype, scale_dtype)
        return fake_quant.fake_quantize_op(
            weight, scales, bits, group_size, [float(a) for a in amplitudes], window
        )
    return quant.fake_quantize(weight, scales, bits, group_size, surrogate, scale_dtype)


def add_lotion_penalty_grad(
    grad: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    curvature: torch.Tensor,
    bits: int,
    group_size: int,
    coefficient: float,
    multiplier: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOTION's penalty gradient added to `grad` (a new tensor) and the penalty's value.

    Same results as `hf_lotion.quant.add_penalty_grad` (to rounding); one fused pass on the kernels.
    """
    if _triton_for(weight, grad) and curvature.dtype == torch.float32:
        from . import lotion

        return lotion.lotion_penalty_grad(
            weight, scales, grad, curvature, multiplier, bits, group_size, float(coefficient)
        )
    return quant.add_penalty_grad(grad, weight, scales, curvature, bits, group_size, coefficient, multiplier)


def dequantize_packed(
    packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    """`s * q` from packed words, `(out, in)` in the scales' dtype (bit-identical on both paths)."""
    if _triton_for(scales) and packed.device == scales.device:
        from . import packed_matmul

        return packed_matmul.dequantize_packed(packed, scales, bits, group_size, in_features)
    q = quant.unpack_int(packed, bits, in_features)
    return quant.dequantize(q, scales, group_size, scales.dtype)


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """`F.linear(x, s * q, bias)` from packed weights (Triton GEMV for decode, dequantize + cuBLAS otherwise)."""
    if x.dtype == scales.dtype and _triton_for(x, scales):
        from . import packed_matmul

        return packed_matmul.packed_linear(x, packed, scales, bias, bits, group_size, in_features)
    return F.linear(x, dequantize_packed(packed, scales, bits, group_size, in_features), bias)


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KERNEL_DTYPES",
    "absmax_scales",
    "add_lotion_penalty_grad",
    "cpu_int4",
    "cpu_int8",
    "dequantize_packed",
    "fake_quantize",
    "interpreter_enabled",
    "kernel_backend",
    "packed_linear",
    "requested_backend",
    "triton_can_run",
    "use_triton",
]
