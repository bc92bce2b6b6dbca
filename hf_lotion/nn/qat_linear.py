"""`LotionLinear`: an `nn.Linear` that holds a full-precision latent weight and trains it quantization-aware."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import absmax_scales, fake_quantize
from ..methods import QatMethod, build_method
from ..quant.grid import quantize_rtn, round_scales, scale_floor
from ..quant.spec import QuantSpec, check_divisible, resolve_group_size

logger = logging.getLogger(__name__)
_WARNED_DETACHED = False  # warn once per process, not once per layer


class LotionLinear(nn.Linear):
    """A QAT linear layer: latent weight (plus learned scales for LSQ), its storage spec and its QAT method.

    * train mode: the method's forward (`method.train_weight`: the latent weight, or a fake-quantized one
      with the method's surrogate backward); a method with a penalty (LOTION) adds it through the model's
      loss, see `hf_lotion.nn.penalty`.
    * eval mode: always the deterministic RTN weight that `hf_lotion.convert` packs (gradients pass
      straight through), so evaluation measures the model that will be exported.

    `qat_linear(x, weight)` runs the same computation on an *effective* weight, for wrappers whose weight
    is made of more than the latent one (adapters: `W + scaling * B A`); `forward(x)` is
    `qat_linear(x, self.weight)`. It subclasses `nn.Linear`, so code that looks for linear layers
    (initialisers, PEFT) keeps working.

    Example:
        >>> layer = LotionLinear.from_linear(nn.Linear(64, 8), QuantSpec(bits=4, group_size=32), method="ste")
        >>> layer.eval()(torch.randn(2, 64)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: QuantSpec | None = None,
        method: QatMethod | str = "lotion",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = spec or QuantSpec()
        check_divisible(spec.group_size, in_features, type(self).__name__)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = spec
        self.method = build_method(method)
        # Set by `latent_weights()`: evaluate the unquantized latent weight (to report the quantization gap).
        self.eval_latent = False
        # Set by `install_penalty` for methods with a penalty.
        self.penalty_runtime = None
        self.penalty_name = ""
        if self.method.learned_scales:
            n_groups = in_features // resolve_group_size(spec.group_size, in_features)
            self.weight_scale = nn.Parameter(torch.empty(out_features, n_groups, device=device, dtype=dtype))
            self.reset_scales()
        else:
            self.register_parameter("weight_scale", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, spec: QuantSpec, method: QatMethod | str = "lotion"
    ) -> LotionLinear:
        """Wrap `linear`, sharing its weight and bias parameters (no copy; works on the meta device)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            spec=spec,
            method=method,
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
        self.weight_scale.copy_(self._absmax_scales(self.weight))

    def _absmax_scales(self, weight: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        return round_scales(absmax_scales(weight, spec.bits, spec.group_size, spec.grid), spec.scale_dtype)

    def quant_scales(
        self, weight: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The scales for `weight` (default: the latent weight), `(out_features, n_groups)`.

        Learned ones (`weight_scale`, default the layer's own; kept above a positive floor) or, for methods
        without learned scales, the absmax rule at `weight`. With `spec.scale_dtype` set, rounded to values
        representable in it (learned scales with a straight-through gradient), in every mode.
        """
        weight = self.weight if weight is None else weight
        weight_scale = self.weight_scale if weight_scale is None else weight_scale
        if weight_scale is None:
            return self._absmax_scales(weight)
        scales = torch.clamp_min(weight_scale, scale_floor(weight, weight_scale.dtype))
        return round_scales(scales, self.spec.scale_dtype)

    @torch.no_grad()
    def quantize_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer levels (int8, `(out, in)`) and scales that `convert` packs."""
        scales = self.quant_scales().detach()
        return quantize_rtn(self.weight, scales, self.spec.bits, self.spec.group_size), scales

    @torch.no_grad()
    def deploy_weight(self) -> torch.Tensor:
        """The dequantized RTN weight the exported model will use, in the weight's dtype."""
        spec = self.spec
        return fake_quantize(
            self.weight, self.quant_scales(), spec.bits, spec.group_size, None, spec.scale_dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qat_linear(x, self.weight)

    def qat_linear(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x @ w^T + b` for the effective weight `weight`, as this layer trains or deploys it.

        Eval mode multiplies by the RTN weight of `weight`; train mode by the method's train weight, with
        the method's penalty (if any) on `weight`, so its gradient reaches whatever `weight` is made of.
        `weight_scale` replaces the layer's learned scales (an adapter's own, trained with it).
        """
        spec = self.spec
        if not self.training:
            if self.eval_latent:
                return F.linear(x, weight, self.bias)
            scales = self.quant_scales(weight, weight_scale)
            w_hat = fake_quantize(weight, scales, spec.bits, spec.group_size, None, spec.scale_dtype)
            return F.linear(x, w_hat, self.bias)
        method = self.method
        context = self._penalty_context(weight)
        uses_scales = context is not None or method.uses_scales()
        scales = self.quant_scales(weight, weight_scale) if uses_scales else None
        if context is not None:
            weight = self.penalty_runtime.penalize_weight(self, weight, scales, context)
        y = F.linear(x, method.train_weight(weight, scales, spec), self.bias)
        if context is not None and context.fisher_due and y.requires_grad:
            y = self.penalty_runtime.probe_output(self.penalty_name, x, y, context)
        return y

    def _penalty_context(self, weight: torch.Tensor):
        """The forward context when the method's penalty applies to this call, else None."""
        if not torch.is_grad_enabled():
            return None
        runtime = self.penalty_runtime
        if runtime is None:
            if self.method.penalty() is None:
                return None
            global _WARNED_DETACHED
            if not _WARNED_DETACHED:
                _WARNED_DETACHED = True
                logger.warning(
                    "LotionLinear with method=%r trains without its penalty: it is not part of a model prepared "
                    "with hf_lotion.prepare / from_pretrained(quantization_config=LotionConfig(...)).",
                    self.method.name,
                )
            return None
        if not weight.requires_grad:
            runtime.warn_once(
                "frozen",
                f"LOTION's penalty has nothing to train in '{self.penalty_name}': its weight is frozen (for "
                "example adapters were added on top of the quantized layer as a plain linear). The penalty acts "
                "on the effective weight that LotionLinear.qat_linear(x, weight) receives; train the weights, "
                "or pass the adapted weight through qat_linear.",
            )
            return None
        context = runtime.context()
        if context is None:
            runtime.warn_once(
                "outside",
                f"'{self.penalty_name}' ran in train mode outside its model's forward: LOTION's penalty is wired "
                "through the model's forward hooks, so this call trains without it.",
            )
        return context

    def extra_repr(self) -> str:
        spec = self.spec
        return (
            f"{super().extra_repr()}, bits={spec.bits}, group_size={spec.group_size}, grid={spec.grid}, "
            + (f"scale_dtype={spec.scale_dtype}, " if spec.scale_dtype else "")
            + f"method={self.method!r}"
        )
