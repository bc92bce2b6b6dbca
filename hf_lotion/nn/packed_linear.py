"""`PackedLinear`: a linear layer whose weight is stored as packed low-bit integers plus group scales."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import absmax_scales, cpu_int4, cpu_int8, dequantize_packed, packed_linear, requested_backend
from ..quant.grid import int_range, quantize_rtn, round_scales, scaled_values
from ..quant.packing import pack_int, packed_words, unpack_int
from ..quant.spec import check_divisible, resolve_group_size

logger = logging.getLogger(__name__)


class _PackedLinearFunction(torch.autograd.Function):
    """`F.linear(x, s * q, b)` whose backward dequantizes the packed weight again instead of saving it.

    Saving the dequantized weight (what autograd does for `F.linear`) would hold a full-precision copy of
    every layer between forward and backward: adapters over a packed base (QLoRA-style) would lose their
    memory advantage. The low-bit tensors (packed words or the CPU kernel's copy) are saved instead.
    """

    @staticmethod
    def forward(ctx, x, bias, layer):
        low_bit = layer.low_bit_tensors()
        ctx.save_for_backward(*low_bit)
        ctx.dequantize, ctx.x_dtype = layer.dequantize_low_bit, x.dtype
        return layer.linear_no_grad(x)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.dequantize(*ctx.saved_tensors)
            grad_x = (grad.to(weight.dtype) @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
        return grad_x, grad_bias, None


class PackedLinear(nn.Module):
    """Inference linear layer holding `weight` (packed int32 words), `weight_scale` and `weight_shape`.

    The layout is compressed-tensors' `pack-quantized` one; only the packed tensor's name differs
    (`weight` here, `weight_packed` there), so that transformers without hf_lotion refuses a packed
    checkpoint (size mismatch on `weight`) instead of silently building random weights, and export to
    compressed-tensors is a renaming.

    What runs (README, "What runs where"): on CPU, `hf_lotion.convert` and loading a packed checkpoint move
    2/3/4-bit layers the kernel takes onto PyTorch's int4 kernel (`prepare_cpu_kernel_`: its copy replaces
    the packed words in memory, checkpoints are unchanged), which computes decode-sized products from the
    low-bit weights directly (to rounding; larger inputs dequantize once and call `F.linear`). Everywhere
    else, and with `HF_LOTION_KERNELS=reference`, the weight is dequantized in the forward (nothing is
    cached) with the same arithmetic as `LotionLinear`'s eval mode, so outputs are bit-identical to the QAT
    model before `convert`. On CUDA with `HF_LOTION_KERNELS=triton`, inputs of up to
    `hf_lotion.kernels.packed_matmul.GEMV_MAX_M` rows use a fused Triton GEMV (outputs equal to rounding),
    larger ones dequantize in Triton and call cuBLAS (bit-identical).

    The packed integers and scales are buffers, never trained. `bias` is an ordinary float `Parameter` that
    requires grad, like the model's other float parameters (norms, embeddings, the output head), whether
    the layer comes from `from_qat`/`hf_lotion.convert` or from `from_pretrained` of a packed checkpoint.
    Freezing is the training setup's job: PEFT freezes the whole base when it adds adapters (and trains
    biases only if asked, `bias="all"`), and transformers' `Trainer` refuses a packed model without adapters.

    Example:
        >>> from hf_lotion.nn import LotionLinear
        >>> from hf_lotion.quant import QuantSpec
        >>> qat = LotionLinear.from_linear(nn.Linear(64, 8), QuantSpec(bits=4, group_size=32)).eval()
        >>> packed = PackedLinear.from_qat(qat)
        >>> x = torch.randn(2, 64)
        >>> torch.equal(packed(x), qat(x))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        grid: str = "full",
        scale_dtype: str | None = None,
    ) -> None:
        super().__init__()
        check_divisible(group_size, in_features, type(self).__name__)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        # The absmax rule the layer was quantized with: only used to re-quantize (merging adapters into it).
        self.grid = grid
        # The dtype the scales were trained to fit (LotionConfig.scale_dtype): re-quantized scales round to it.
        self.scale_dtype = scale_dtype
        n_groups = in_features // resolve_group_size(group_size, in_features)
        dtype = dtype or torch.get_default_dtype()
        words = packed_words(in_features, bits)
        self.register_buffer("weight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def empty_like(
        cls,
        linear: nn.Linear,
        bits: int,
        group_size: int,
        device: torch.device | str | None = None,
        grid: str = "full",
        scale_dtype: str | None = None,
    ) -> PackedLinear:
        """An unfilled packed layer with `linear`'s shape, bias and dtype, on `device` (default: `linear`'s)."""
        return cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            bias=linear.bias is not None,
            device=linear.weight.device if device is None else device,
            dtype=linear.weight.dtype,
            grid=grid,
            scale_dtype=scale_dtype,
        )

    @classmethod
    def from_qat(cls, layer: nn.Module) -> PackedLinear:
        """Pack a `LotionLinear`'s RTN integers and scales (the weights its eval mode uses)."""
        q, scales = layer.quantize_weight()
        spec = layer.spec
        packed = cls.empty_like(
            layer, spec.bits, spec.group_size, grid=spec.grid, scale_dtype=spec.scale_dtype
        )
        packed.weight.copy_(pack_int(q, spec.bits))
        packed.weight_scale.copy_(scales)
        if layer.bias is not None:
            # A copy, not the QAT layer's Parameter: `layer` is left untouched (and not aliased), and the bias
            # requires grad as after `from_pretrained` of the saved packed checkpoint.
            packed.bias = nn.Parameter(layer.bias.detach().clone())
        return packed

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    # --- the CPU kernel's copy -------------------------------------------------------------------------
    @property
    def cpu_kernel_ready(self) -> bool:
        """Whether `weight` holds a CPU kernel's copy (int4: uint8, int8: int8) rather than packed words (int32)."""
        return self._buffers["weight"].dtype != torch.int32

    def prepare_cpu_kernel_(self) -> bool:
        """Hold the weight in the layout of a PyTorch CPU kernel instead of packed words; True if it did.

        Done once, by `hf_lotion.convert` and when a packed checkpoint is loaded, for CPU layers of 2, 3 or 4
        bits whose group size the int4 kernel takes (32 to 256; per-row scales where in_features allows) and
        whose out_features is a multiple of 16, and for bf16 8-bit layers with per-row scales and
        in_features a multiple of 16 (int8 kernel). The kernel's copy *replaces* the packed words in
        `weight` (uint8, half a byte per weight, or int8 levels, instead of int32 words); the scales are
        shared with it. `state_dict`,
        `packed_weight`, `int_weight` and `dequantized_weight` read the levels back from it exactly, so
        checkpoints and exports do not change, and `HF_LOTION_KERNELS=reference` computes the bit-exact
        reference from it. A layer moved to another device goes back to packed words at its first forward
        there (`release_cpu_kernel_`).

        Example:
            >>> from hf_lotion.nn import LotionLinear
            >>> from hf_lotion.quant import QuantSpec
            >>> qat = LotionLinear.from_linear(nn.Linear(64, 32), QuantSpec(bits=4, group_size=32)).eval()
            >>> packed = PackedLinear.from_qat(qat)
            >>> reference = packed.dequantized_weight()
            >>> packed.prepare_cpu_kernel_()
            True
            >>> torch.equal(packed.dequantized_weight(), reference)
            True
        """
        if self.cpu_kernel_ready:
            return True
        words = self.weight
        # Layers accelerate dispatches or offloads get their tensors written back by its hooks: left as they are.
        if words.device.type != "cpu" or hasattr(self, "_hf_hook"):
            return False
        if cpu_int8.supports(self.bits, self.weight_scale.shape[1], self.in_features, self.dtype):
            # The same bytes as the packed words, as int8 levels.
            self.register_buffer(
                "weight", unpack_int(words, 8, self.in_features).contiguous(), persistent=False
            )
            return True
        if cpu_int4.max_kernel_rows(self.dtype) == 0:
            return False  # e.g. fp16: the kernel runs scalar code there, slower than dequantize + F.linear
        if not cpu_int4.supports(self.bits, self.group_size, self.in_features, self.out_features):
            return False
        with torch.no_grad():
            try:
                int4 = cpu_int4.to_int4pack(unpack_int(words, self.bits, self.in_features))
            except RuntimeError as error:
                logger.warning("CPU int4 kernel not used (%s); this layer dequantizes per call.", error)
                return False
        self.register_buffer("weight", int4, persistent=False)
        self._attach_kernel_scales()
        return True

    def release_cpu_kernel_(self) -> None:
        """Go back to packed words (the layout every device runs), from the CPU kernel's copy."""
        if not self.cpu_kernel_ready:
            return
        words = self.packed_weight()
        self._buffers["weight_scale"] = self.weight_scale.contiguous()
        self._buffers.pop("int4_scales_and_zeros", None)
        self.register_buffer("weight", words, persistent=True)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cpu_kernel_ready:
            # The checkpoint keeps packed words whatever layout runs: same names, shapes and bytes.
            destination[prefix + "weight"] = self.packed_weight()
            destination[prefix + "weight_scale"] = self.weight_scale.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        touched = any(f"{prefix}{name}" in state_dict for name in ("weight", "weight_scale"))
        prepared = touched and self.cpu_kernel_ready
        if prepared:  # loading words into the kernel's layout: go back to words, load, prepare again
            self.release_cpu_kernel_()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prepared:
            self.prepare_cpu_kernel_()

    def __getstate__(self):
        # Pickle packed words: the kernel's layout depends on the CPU it was made on (AVX-512 vs AVX2 blocks).
        state = super().__getstate__()
        if not self.cpu_kernel_ready:
            return state
        state = dict(state)
        buffers = dict(state["_buffers"])
        buffers.pop("int4_scales_and_zeros", None)
        buffers["weight_scale"] = self.weight_scale.contiguous()
        buffers["weight"] = self.packed_weight()
        state["_buffers"] = buffers
        state["_non_persistent_buffers_set"] = state["_non_persistent_buffers_set"] - {
            "weight",
            "int4_scales_and_zeros",
        }
        state["_prepare_on_unpickle"] = True
        return state

    def __setstate__(self, state):
        prepare = state.pop("_prepare_on_unpickle", False)
        super().__setstate__(state)
        if prepare:
            self.prepare_cpu_kernel_()

    def _attach_kernel_scales(self) -> torch.Tensor:
        """Build the kernel's `scales_and_zeros` from `weight_scale`. Where the groups match, `weight_scale`
        becomes a view of it (one copy, always in step); per-row scales repeated into groups are a copy,
        remembered by `weight_scale`'s identity and version so that a change rebuilds it."""
        scales = self.weight_scale
        with torch.no_grad():
            kernel = cpu_int4.kernel_scales_and_zeros(scales, self.group_size, self.in_features)
        self.register_buffer("int4_scales_and_zeros", kernel, persistent=False)
        if kernel.shape[0] == scales.shape[1]:
            self._buffers["weight_scale"] = kernel[..., 0].t()
        else:
            self._kernel_scales_key = (scales.data_ptr(), scales._version, scales.dtype, scales.device)
        return kernel

    def _kernel_scales_and_zeros(self) -> torch.Tensor:
        """The kernel's scales, rebuilt if `weight_scale` changed since (in place, or by a dtype/device move)."""
        kernel, scales = self.int4_scales_and_zeros, self.weight_scale
        shared = scales.untyped_storage().data_ptr() == kernel.untyped_storage().data_ptr()
        key = (scales.data_ptr(), scales._version, scales.dtype, scales.device)
        if shared or getattr(self, "_kernel_scales_key", None) == key:
            return kernel
        return self._attach_kernel_scales()

    def low_bit_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels in their current layout, scales): what a backward pass saves instead of the weight."""
        return self.weight, self.weight_scale

    def dequantize_low_bit(self, low_bit: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """`s * q` from `low_bit_tensors()` (either layout), bit-identical to the reference."""
        if low_bit.dtype == torch.uint8:
            return cpu_int4.dequantize_int4pack(low_bit, scales, self.group_size, self.in_features)
        if low_bit.dtype == torch.int8:
            return cpu_int8.dequantize_int8(low_bit, scales)
        return dequantize_packed(low_bit, scales, self.bits, self.group_size, self.in_features)

    # --- the weight ------------------------------------------------------------------------------------
    def packed_weight(self) -> torch.Tensor:
        """The packed int32 words `(out_features, words)` of the checkpoint format, whatever layout runs."""
        if self.cpu_kernel_ready:
            return pack_int(self.int_weight(), self.bits)
        return self.weight

    def int_weight(self) -> torch.Tensor:
        """The signed integer levels, int8 `(out_features, in_features)`."""
        if self.weight.dtype == torch.uint8:
            return cpu_int4.from_int4pack(self.weight, self.out_features, self.in_features)
        if self.weight.dtype == torch.int8:
            return self.weight.clone()
        return unpack_int(self.weight, self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """`s * q` in the scales' dtype, computed exactly as the QAT model's eval mode does."""
        return self.dequantize_low_bit(*self.low_bit_tensors())

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Quantize a float `weight` `(out, in)` onto this layer's grid, in place.

        A group keeps its scale where every weight still rounds into the range (so re-quantizing the layer's
        own dequantized weight changes nothing); a group that no longer fits gets the absmax scale of its new
        weights. Refitting every group to absmax would move all of them: on the full grid a quantized group's
        absmax is not the one its scale was fitted to.
        """
        weight = weight.to(self.dtype)
        qmin, qmax = int_range(self.bits)
        v = scaled_values(weight, self.weight_scale, self.group_size)
        fits = ((v >= qmin - 0.5) & (v <= qmax + 0.5)).all(dim=-1)
        refit = round_scales(absmax_scales(weight, self.bits, self.group_size, self.grid), self.scale_dtype)
        scales = torch.where(fits, self.weight_scale, refit)
        levels = quantize_rtn(weight, scales, self.bits, self.group_size)
        prepared = self.cpu_kernel_ready
        self.release_cpu_kernel_()
        self.weight.copy_(pack_int(levels, self.bits))
        self.weight_scale.copy_(scales)
        if prepared:
            self.prepare_cpu_kernel_()

    # --- forward ---------------------------------------------------------------------------------------
    def linear_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """The forward's product (no autograd graph through the weight)."""
        if self.cpu_kernel_ready:
            if (
                x.device.type == "cpu"
                and x.dtype == self.dtype
                and requested_backend() == "auto"
                and not torch.is_autocast_enabled("cpu")  # F.linear follows autocast; the kernels do not
            ):
                if self.weight.dtype == torch.int8:
                    return cpu_int8.int8_linear(x, self.weight, self.weight_scale, self.bias)
                return cpu_int4.int4_linear(
                    x,
                    self.weight,
                    self._kernel_scales_and_zeros(),
                    self.weight_scale,
                    self.bias,
                    self.group_size,
                    self.in_features,
                )
            return F.linear(x, self.dequantized_weight(), self.bias)
        # On CUDA: the Triton GEMV for decode-sized inputs, dequantize + cuBLAS for larger ones.
        args = (self.weight, self.weight_scale, self.bias, self.bits, self.group_size, self.in_features)
        return packed_linear(x, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel_ready and self.weight.device.type != "cpu":
            self.release_cpu_kernel_()  # moved off the CPU: packed words run everywhere
        bias_grad = self.bias is not None and self.bias.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or bias_grad):
            return _PackedLinearFunction.apply(x, self.bias, self)
        return self.linear_no_grad(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )
