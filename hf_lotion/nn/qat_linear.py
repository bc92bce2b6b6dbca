"""`LotionLinear`: an `nn.Linear` that holds a full-precision latent weight and trains it quantization-aware."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import absmax_scales, fake_quantize
from ..quant.grid import quantize_rtn, scale_floor
from ..quant.spec import FAKE_QUANT_METHODS, QuantSpec, check_divisible, resolve_group_size


class LotionLinear(nn.Linear):
    """A QAT linear layer: latent weight (plus learned scales for LSQ) and its quantization spec.

    * train mode: the method's forward. `lotion` and `rtn` use the latent weight (LOTION's regulariser is
      added to the gradient by the trainer or `hf_lotion.lotion_regularizer`); `ste` and `stableqat`
      fake-quantize it with their surrogate backward.
    * eval mode: always the deterministic RTN weight that `hf_lotion.convert` packs (gradients pass
      straight through), so evaluation measures the model that will be exported.

    It subclasses `nn.Linear`, so code that looks for linear layers (initialisers, PEFT) keeps working.

    Example:
        >>> layer = LotionLinear.from_linear(nn.Linear(64, 8), QuantSpec(bits=4, group_size=32, method="ste"))
        >>> layer.eval()(torch.randn(2, 64)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: QuantSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = spec or QuantSpec()
        check_divisible(spec.group_size, in_features, type(self).__name__)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = spec
        # Set by `latent_weights()`: evaluate the unquantized latent weight (to report the quantization gap).
        self.eval_latent = False
        if spec.learned_scales:
            n_groups = in_features // resolve_group_size(spec.group_size, in_features)
            self.weight_scale = nn.Parameter(torch.empty(out_features, n_groups, device=device, dtype=dtype))
            self.reset_scales()
        else:
            self.register_parameter("weight_scale", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> LotionLinear:
        """Wrap `linear`, sharing its weight and bias parameters (no copy; works on the meta device)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            spec=spec,
            device="meta",
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        if layer.weight_scale is not None:
            layer.weight_scale = nn.Parameter(
                torch.empty(layer.weight_scale.shape, device=linear.weight.device, dtype=linear.weight.dtype)
            )
            layer.reset_scales()
        layer.train(linear.training)
        return layer

    @torch.no_grad()
    def reset_scales(self) -> None:
        """Set learned scales to the absmax rule at the current weight (StableQAT's initialisation)."""
        if self.weight_scale is None or self.weight.is_meta:
            return
        self.weight_scale.copy_(self._absmax_scales())

    def _absmax_scales(self) -> torch.Tensor:
        spec = self.spec
        return absmax_scales(self.weight, spec.bits, spec.group_size, spec.grid)

    def quant_scales(self) -> torch.Tensor:
        """The scales in use, `(out_features, n_groups)`: learned ones (kept above a positive floor) or absmax."""
        if self.weight_scale is None:
            return self._absmax_scales()
        return torch.clamp_min(self.weight_scale, scale_floor(self.weight, self.weight_scale.dtype))

    @torch.no_grad()
    def quantize_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer levels (int8, `(out, in)`) and scales that `convert` packs."""
        scales = self.quant_scales().detach()
        return quantize_rtn(self.weight, scales, self.spec.bits, self.spec.group_size), scales

    @torch.no_grad()
    def deploy_weight(self) -> torch.Tensor:
        """The dequantized RTN weight the exported model will use, in the weight's dtype."""
        return fake_quantize(self.weight, self.quant_scales(), self.spec.bits, self.spec.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if not self.training:
            if self.eval_latent:
                return F.linear(x, self.weight, self.bias)
            weight = fake_quantize(self.weight, self.quant_scales(), spec.bits, spec.group_size)
        elif spec.method in FAKE_QUANT_METHODS:
            weight = fake_quantize(
                self.weight, self.quant_scales(), spec.bits, spec.group_size, spec.surrogate_amplitudes
            )
        else:  # lotion and rtn train the latent weight
            weight = self.weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        spec = self.spec
        return (
            f"{super().extra_repr()}, bits={spec.bits}, group_size={spec.group_size}, method={spec.method}, "
            f"grid={spec.grid}, learned_scales={spec.learned_scales}"
        )
