"""LoRA layers for hf_lotion's quantized layers (imported only once peft is).

* `LotionLoraLinear` (QAT adapters, on a `LotionLinear`): the layer computes `F.linear(x, Q(W + s B A))` with
  the frozen latent `W`, through the base layer's method (`LotionLinear.qat_linear`): LOTION's penalty and
  curvature act on the effective weight, STE/StableQAT's surrogate goes through `Q`, and learned scales are
  the adapter's own (initialised from the base's, trained and saved with it). Merging writes
  `W + s B A` (the same arithmetic as the forward) and the adapter's scales into the base, so
  `merge_and_unload()` then `hf_lotion.convert` gives a packed model bit-identical to the eval-mode adapter
  model.
* `PackedLoraLinear` (adapters over a packed base, QLoRA-style): `PackedLinear(x) + s B A x`, the base frozen
  in low bit and dequantized per call (also in backward, never saved). Merging must re-quantize
  `dequantize(W) + s B A`, which loses the exactness above: it is refused unless asked for with
  `hf_lotion.requantizing_merge()` (in `hf_lotion.adapters`, which needs no peft), and warns.

Both keep a persistent `lora_spec` buffer per adapter (saved in the adapter file): which kind of base and
which grid (bits, group size, grid) the adapter was trained for, checked when an adapter is loaded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..nn.packed_linear import PackedLinear
from ..nn.qat_linear import LotionLinear
from ..quant.spec import GRIDS
from . import requantizing_merge_allowed

logger = logging.getLogger(__name__)

# `lora_spec` holds (base kind, bits, group_size, grid index).
QAT_BASE, PACKED_BASE = 0, 1
_BASE_NAMES = {QAT_BASE: "QAT adapters on a latent LotionLinear", PACKED_BASE: "adapters on a packed base"}


def describe_spec(spec: torch.Tensor) -> str:
    kind, bits, group_size, grid = (int(v) for v in spec.tolist())
    grid_name = GRIDS[grid] if 0 <= grid < len(GRIDS) else f"grid #{grid}"
    return f"{_BASE_NAMES.get(kind, f'base kind {kind}')}, bits={bits}, group_size={group_size}, grid={grid_name}"


def _spec_mismatch(spec: torch.Tensor, own: torch.Tensor, subject: str, outcome: str) -> ValueError:
    return ValueError(
        f"{subject} trained for {describe_spec(spec)}; this layer is {describe_spec(own)}; allowed: an adapter "
        f"trained on a base quantized the same way. {outcome}"
    )


class _SpecCheckedLora(PeftLoraLinear):
    """Shared by both layers: plain LoRA only (no variants), and the adapter's `lora_spec`."""

    other_param_names = (*PeftLoraLinear.other_param_names, "lora_spec")

    @property
    def lora_variants(self) -> dict:
        return {(): None}  # DoRA and the other variants are refused before injection

    def base_spec(self) -> torch.Tensor:
        """`(base kind, bits, group_size, grid index)` of the layer the adapters sit on."""
        base = self.get_base_layer()
        kind = PACKED_BASE if isinstance(base, PackedLinear) else QAT_BASE
        spec = base if kind == PACKED_BASE else base.spec  # PackedLinear carries bits/group_size/grid itself
        return torch.tensor([kind, spec.bits, spec.group_size, GRIDS.index(spec.grid)])

    def _make_adapter_dicts(self) -> None:
        # Here rather than in __init__: peft's __init__ adds the first adapter before returning.
        if "lora_spec" not in self._modules:
            self.lora_spec = BufferDict(persistent=True)
            self._checked_specs: dict[str, tuple] = {}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        self._make_adapter_dicts()
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.lora_spec[adapter_name] = self.base_spec()

    def check_spec(self, adapter: str) -> None:
        """Raise if `adapter` was trained for another base than this layer's (loaded by any route).

        peft's loader is checked in `_load_from_state_dict`; transformers' `load_adapter` writes the buffers
        without it, so the adapter is checked again when first used (cached per tensor version).
        """
        spec = self.lora_spec._buffers.get(adapter)  # BufferDict keeps its tensors as buffers
        key = None if spec is None else (id(spec), spec._version)
        if spec is None or self._checked_specs.get(adapter) == key:
            return
        own = self.base_spec()
        if not torch.equal(spec.cpu(), own):
            raise _spec_mismatch(
                spec,
                own,
                f"Adapter '{adapter}' was",
                "Remove it (delete_adapter) and load one trained for this base.",
            )
        self._checked_specs[adapter] = key

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Before this layer's (or any later layer's) adapter tensors are copied in.
        own = self.base_spec()
        for key, value in state_dict.items():
            if key.startswith(f"{prefix}lora_spec.") and not torch.equal(value.to(own.device), own):
                subject = f"The adapter weights for '{prefix.rstrip('.')}' were"
                raise _spec_mismatch(value, own, subject, "The adapter was not loaded.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LotionLoraLinear(_SpecCheckedLora):
    """LoRA on a `LotionLinear`: `Q(W + s B A)`, trained under the base layer's QAT method (module docstring).

    Example:
        >>> from peft import LoraConfig, get_peft_model  # doctest: +SKIP
        >>> peft_model = get_peft_model(qat_model, LoraConfig(r=8, target_modules="all-linear"))  # doctest: +SKIP
    """

    adapter_layer_names = (*PeftLoraLinear.adapter_layer_names, "lora_weight_scale")

    def _make_adapter_dicts(self) -> None:
        super()._make_adapter_dicts()
        if "lora_weight_scale" not in self._modules:
            self.lora_weight_scale = nn.ParameterDict()
            self._scales_before_merge: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        base_scale = self.get_base_layer().weight_scale
        if base_scale is not None:
            # The adapter's own learned scales: those of W + s B A, trained with the adapter, merged with it.
            scale = nn.Parameter(base_scale.detach().clone())  # peft may upcast it to fp32 afterwards
            scale.requires_grad_(adapter_name in self.active_adapters and not config.inference_mode)
            self.lora_weight_scale[adapter_name] = scale

    def exact_delta(self, adapter: str) -> torch.Tensor:
        """`s B A` in the adapters' dtype, outside autocast: the forward and the merge compute it identically."""
        with torch.autocast(self.lora_A[adapter].weight.device.type, enabled=False):
            return self.get_delta_weight(adapter)

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`W + sum s B A` over the active adapters (in the base weight's dtype) and the scales to use."""
        base = self.get_base_layer()
        weight, weight_scale = base.weight, None
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            self.check_spec(adapter)
            weight = weight + self.exact_delta(adapter).to(weight.dtype)
            if adapter in self.lora_weight_scale:
                # In the base's scale dtype, as stored once merged and packed (peft keeps adapters in fp32).
                weight_scale = self.lora_weight_scale[adapter].to(base.weight_scale.dtype)
        return weight, weight_scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(
                "adapter_names (a different adapter per example) is not supported on QAT adapters: the adapters "
                "live inside the quantized weight Q(W + s B A). Use set_adapter() per batch."
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        weight, weight_scale = self.effective_weight()
        return self.get_base_layer().qat_linear(x, weight, weight_scale)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write `W + s B A` (as the forward computes it) and the adapter's scales into the base layer."""
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            self.check_spec(adapter)
            with torch.no_grad():
                merged = base.weight + self.exact_delta(adapter).to(base.weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                    )
                base.weight.data = merged
                if adapter in self.lora_weight_scale:
                    self._scales_before_merge[adapter] = base.weight_scale.detach().clone()
                    scale = self.lora_weight_scale[adapter].detach()
                    base.weight_scale.data = scale.to(base.weight_scale.dtype, copy=True)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the adapters again (to rounding, as peft does) and restore the base's scales exactly."""
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            with torch.no_grad():
                base.weight.data = base.weight - self.exact_delta(adapter).to(base.weight.dtype)
                previous = self._scales_before_merge.pop(adapter, None)
                if previous is not None:
                    base.weight_scale.data = previous


class PackedLoraLinear(_SpecCheckedLora):
    """LoRA over a `PackedLinear` (QLoRA-style): `PackedLinear(x) + s B A x`.

    Merging re-quantizes and is refused unless inside `hf_lotion.requantizing_merge()`.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged and not self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if not self.disable_adapters:
            for adapter in self.active_adapters:
                if adapter in self.lora_A:
                    self.check_spec(adapter)
        return super().forward(x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapters = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapters:
            return
        for adapter in adapters:
            self.check_spec(adapter)
        if not requantizing_merge_allowed():
            raise ValueError(
                "Merging LoRA adapters into a packed base re-quantizes dequantize(W) + s B A onto a new grid, so "
                "the merged model is not the adapter model (README: 'LoRA over a packed base' gives the error). "
                "Allowed: opt in with `with hf_lotion.requantizing_merge(): model.merge_and_unload()`, or train "
                "QAT adapters on the latent model, whose merge is exact."
            )
        base = self.get_base_layer()
        with torch.no_grad():
            weight = base.dequantized_weight()
            for adapter in adapters:
                weight = weight + self.get_delta_weight(adapter).to(weight.dtype)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapters {adapters} seem to be broken"
                )
            base.requantize_(weight)
        self.merged_adapters.extend(adapters)
        logger.warning(
            "Merged %s into a packed base by re-quantizing dequantize(W) + s B A: the merged model differs from "
            "the adapter model by the new rounding.",
            adapters,
        )

    def unmerge(self) -> None:
        raise ValueError(
            "Adapters merged into a packed base were re-quantized with it and cannot be unmerged; reload the "
            "packed checkpoint and the adapter instead."
        )


QAT_LORA_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    LotionLinear: LotionLoraLinear,
    PackedLinear: PackedLoraLinear,
}
