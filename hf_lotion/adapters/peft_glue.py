"""Plain `peft.get_peft_model` on an hf_lotion model gives QAT adapters: the injection hook (imported with peft).

peft dispatches a LoRA target to the first LoRA layer class that accepts it, and tries the classes registered
on the config (`LoraConfig._register_custom_module`) first. `BaseTuner.inject_adapter` is wrapped so that,
when the model holds hf_lotion layers, the config is checked and gets hf_lotion's LoRA layers registered
before anything is injected. Every way peft adds an adapter goes through `inject_adapter`:
`get_peft_model`, `PeftModel.from_pretrained`, `load_adapter` and `add_adapter`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.other import get_pattern_key
from torch import nn

from ..nn.qat_linear import LotionLinear
from .lora import QAT_LORA_LAYERS

# `init_lora_weights` values that only initialise A and B; the others read or rewrite the base weight.
PLAIN_INITS = (True, False, "gaussian")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The hf_lotion layers of `model` by name (a layer already wrapped by adapters under the wrapper's name)."""
    layers = {}
    for name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, tuple(QAT_LORA_LAYERS)) and not name.endswith(".base_layer"):
            layers[name] = base
    return layers


def _refuse(field: str, value: Any, allowed: str, why: str) -> None:
    raise ValueError(
        f"LoraConfig.{field}={value!r} is not supported on hf_lotion's quantized layers ({why}); allowed: {allowed}."
    )


def check_lora_config(config: Any, qat_targets: bool) -> None:
    """Plain LoRA only: what `Q(W + s B A)` (or a packed base) can train and merge.

    `qat_targets`: whether some target is a latent QAT layer (dropout is fine over a packed base).
    """
    if config.lora_dropout and qat_targets:
        _refuse(
            "lora_dropout",
            config.lora_dropout,
            "0.0",
            "QAT adapters live inside the quantized weight Q(W + s B A), where there is no adapter input to drop",
        )
    if config.init_lora_weights not in PLAIN_INITS:
        _refuse(
            "init_lora_weights",
            config.init_lora_weights,
            "True, False, 'gaussian'",
            "it reads or rewrites the base weight",
        )
    variants = [
        field.name
        for field in dataclasses.fields(config)
        if field.metadata.get("is_lora_variant") and getattr(config, field.name)
    ]
    if variants:
        _refuse(variants[0], getattr(config, variants[0]), "plain LoRA (False / None)", "a LoRA variant")
    if config.lora_bias:
        _refuse(
            "lora_bias",
            config.lora_bias,
            "False",
            "the bias is not quantized; train it with bias='lora_only'",
        )
    if config.fan_in_fan_out:
        _refuse(
            "fan_in_fan_out", config.fan_in_fan_out, "False", "hf_lotion's layers store (out, in) weights"
        )
    if getattr(config, "target_parameters", None):
        _refuse(
            "target_parameters", config.target_parameters, "None", "adapters on parameters are not quantized"
        )


def _targets(tuner: BaseTuner, model: nn.Module, config: Any, layers: dict[str, nn.Module]) -> list[str]:
    """The module names `config` targets, as peft will resolve them (defaults per model type included)."""
    resolved = tuner._prepare_adapter_config(copy.copy(config), tuner.get_model_config(model))
    if resolved.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        # peft's "all-linear" means every nn.Linear but the output head; on a quantized model that is every
        # quantized layer (packed layers are not nn.Linear, so peft alone would find none of them).
        config.target_modules = resolved.target_modules = set(layers)
    return [
        name
        for name, module in model.named_modules()
        if name
        and ".lora_" not in f".{name}"
        and not name.endswith(".base_layer")
        and not isinstance(module, nn.ModuleDict)
        and check_target_module_exists(resolved, name)
    ]


def prepare_injection(tuner: BaseTuner, model: nn.Module, adapter_name: str) -> None:
    """Check an adapter about to be injected into a model with hf_lotion layers; register its LoRA layers.

    Raises `ValueError`, before anything changes, for adapter types other than LoRA, LoRA options that a
    quantized layer cannot train or merge, targets that are not quantized layers, and ranks above a layer's.
    """
    layers = quantized_layers(model)
    if not layers:
        return
    # The tuner's own copy: "all-linear" is rewritten and LoRA layers registered on it, not on the caller's.
    config = tuner.peft_config[adapter_name] = copy.copy(tuner.peft_config[adapter_name])
    sample = ", ".join(sorted(layers)[:4])
    if type(tuner) is not LoraModel:
        raise ValueError(
            f"{type(config).__name__} adapters on a model quantized with hf_lotion would be ordinary adapters "
            "outside the quantization (trained and merged in full precision); allowed: peft.LoraConfig, which "
            "hf_lotion trains inside the quantized weight (get_peft_model(model, LoraConfig(...)))."
        )
    targets = _targets(tuner, model, config, layers)
    check_lora_config(config, any(isinstance(layers.get(name), LotionLinear) for name in targets))
    others = [name for name in targets if name not in layers]
    if others:
        raise ValueError(
            f"LoRA targets {others[:6]}{' ...' if len(others) > 6 else ''} are not quantized layers of this "
            "hf_lotion model: adapters there would be ordinary full-precision LoRA, outside what convert and the "
            f"packed checkpoint quantize. Allowed: quantized layers only (for example {sample}); use "
            "target_modules='all-linear' (every quantized layer) or exclude_modules."
        )
    for name in targets:
        layer = layers[name]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        if r > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"LoraConfig.r={r} is larger than layer '{name}' allows ({layer.out_features}x{layer.in_features}); "
                f"allowed: 1 to {min(layer.in_features, layer.out_features)}."
            )
    config._register_custom_module(dict(QAT_LORA_LAYERS))


def install() -> None:
    """Wrap `BaseTuner.inject_adapter` with `prepare_injection` (idempotent)."""
    current = BaseTuner.inject_adapter
    if getattr(current, "hf_lotion_original", None) is not None:
        return

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        prepare_injection(self, model, adapter_name)
        with warnings.catch_warnings():
            # peft reads in/out features of layers it does not know and warns; PackedLinear has them.
            warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class 'hf_lotion\.")
            return current(self, model, adapter_name, *args, **kwargs)

    inject_adapter.hf_lotion_original = current
    inject_adapter.__doc__ = current.__doc__
    BaseTuner.inject_adapter = inject_adapter
