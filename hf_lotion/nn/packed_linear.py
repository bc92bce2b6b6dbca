"""`PackedLinear`: a linear layer whose weight is stored as packed low-bit integers plus group scales."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import absmax_scales, dequantize_packed, packed_linear
from ..quant.grid import int_range, quantize_rtn, scaled_values
from ..quant.packing import pack_int, packed_words, unpack_int
from ..quant.spec import check_divisible, resolve_group_size


class _PackedLinearFunction(torch.autograd.Function):
    """`F.linear(x, s * q, b)` whose backward dequantizes the packed weight again instead of saving it.

    Saving the dequantized weight (what autograd does for `F.linear`) would hold a full-precision copy of
    every layer between forward and backward: adapters over a packed base (QLoRA-style) would lose their
    memory advantage. The packed words and scales are saved instead.
    """

    @staticmethod
    def forward(ctx, x, packed, scales, bias, bits, group_size, in_features):
        ctx.save_for_backward(packed, scales)
        ctx.args, ctx.x_dtype = (bits, group_size, in_features), x.dtype
        return packed_linear(x, packed, scales, bias, bits, group_size, in_features)

    @staticmethod
    def backward(ctx, grad):
        packed, scales = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_packed(packed, scales, *ctx.args)
            grad_x = (grad.to(weight.dtype) @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
        return grad_x, None, None, grad_bias, None, None, None


class PackedLinear(nn.Module):
    """Inference linear layer holding `weight` (packed int32 words), `weight_scale` and `weight_shape`.

    The layout is compressed-tensors' `pack-quantized` one; only the packed tensor's name differs
    (`weight` here, `weight_packed` there), so that transformers without hf_lotion refuses a packed
    checkpoint (size mismatch on `weight`) instead of silently building random weights, and export to
    compressed-tensors is a renaming. The weight is dequantized on the fly in every forward (nothing is
    cached, so memory stays low-bit) with the same arithmetic as `LotionLinear`'s eval mode, so outputs
    are bit-identical to the QAT model before `convert`. On CUDA, inputs of up to
    `hf_lotion.kernels.packed_matmul.GEMV_MAX_M` rows use a fused Triton GEMV that reads only the packed
    weight (outputs equal to rounding), larger ones dequantize in Triton and call cuBLAS (bit-identical).

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
    ) -> None:
        super().__init__()
        check_divisible(group_size, in_features, type(self).__name__)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        # The absmax rule the layer was quantized with: only used to re-quantize (merging adapters into it).
        self.grid = grid
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
        )

    @classmethod
    def from_qat(cls, layer: nn.Module) -> PackedLinear:
        """Pack a `LotionLinear`'s RTN integers and scales (the weights its eval mode uses)."""
        q, scales = layer.quantize_weight()
        spec = layer.spec
        packed = cls.empty_like(layer, spec.bits, spec.group_size, grid=spec.grid)
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

    def int_weight(self) -> torch.Tensor:
        """The signed integer levels, int8 `(out_features, in_features)`."""
        return unpack_int(self.weight, self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """`s * q` in the scales' dtype, computed exactly as the QAT model's eval mode does."""
        return dequantize_packed(self.weight, self.weight_scale, self.bits, self.group_size, self.in_features)

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
        refit = absmax_scales(weight, self.bits, self.group_size, self.grid)
        scales = torch.where(fits, self.weight_scale, refit)
        self.weight.copy_(pack_int(quantize_rtn(weight, scales, self.bits, self.group_size), self.bits))
        self.weight_scale.copy_(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.weight, self.weight_scale, self.bias, self.bits, self.group_size, self.in_features)
        bias_grad = self.bias is not None and self.bias.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or bias_grad):
            return _PackedLinearFunction.apply(x, *args)
        # On CUDA: the Triton GEMV for decode-sized inputs, dequantize + cuBLAS for larger ones.
        return packed_linear(x, *args)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )
