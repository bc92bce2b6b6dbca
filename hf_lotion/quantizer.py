"""The transformers `HfQuantizer` for quant_method "lotion", and `prepare` for models already in memory."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
)

from .checkpoint import (
    FORMAT_VERSION,
    METADATA_FORMAT_KEY,
    METADATA_VERSION_KEY,
    check_checkpoint_files,
    check_packed_checkpoint,
)
from .config import QUANT_METHOD, LotionConfig
from .loss import anchor_model_loss
from .nn.packed_linear import PackedLinear
from .nn.penalty import PenaltyRuntime, install_penalty
from .nn.qat_linear import LotionLinear
from .nn.replace import (
    check_layers,
    check_not_tied,
    lotion_layers,
    quantizable_linears,
    replace_linear_layers,
)

logger = logging.getLogger(__name__)


class LotionHfQuantizer(HfQuantizer):
    """Swaps eligible `nn.Linear` layers while `from_pretrained` builds the model (on the meta device).

    * format "latent": `LotionLinear`, which keeps the `weight`/`bias` names, so a float or latent
      checkpoint loads with no conversion step. Learned scales that the checkpoint does not have (first
      quantization of a float model) are derived from the loaded weights. The safetensors headers are
      checked first (complete files, a format version this code reads).
    * format "packed": `PackedLinear`, whose buffers carry the checkpoint's names and shapes, so no float
      weight is ever materialised. The checkpoint's headers are checked first (complete files, a format
      version this code reads, every packed tensor present with the shape the config implies).
    """

    requires_calibration = False
    quantization_config: LotionConfig

    def __init__(self, quantization_config: LotionConfig, **kwargs: Any) -> None:
        # A copy: resolving defaults per model (group_size) must not change the caller's config object.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.modules_to_not_convert: list[str] = []

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        config = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None)
        )
        if config.format == "packed":
            self._build_packed_layers(model, checkpoint_files or [])
            return
        # Every shard's header, before any weight is read: a truncated or corrupted file (or one of a newer
        # format version) gets a ValueError naming it instead of safetensors' error naming no file.
        check_checkpoint_files(f for f in checkpoint_files or () if f.endswith(".safetensors"))
        layers = quantizable_linears(model, self.modules_to_not_convert)
        config.resolve_group_size((m.in_features for _, m in layers), type(model).__name__)
        method = config.build_method()
        replace_linear_layers(model, config.to_spec(), method, self.modules_to_not_convert)
        if method.learned_scales and not self.pre_quantized:
            # A float checkpoint has no scales: they are derived from the loaded weights, not "missing".
            ignored = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            model._keys_to_ignore_on_load_missing = ignored | {r"\.weight_scale$"}

    def _build_packed_layers(self, model: PreTrainedModel, checkpoint_files: list[str]) -> None:
        config = self.quantization_config
        if not self.pre_quantized:
            raise ValueError(
                "LotionConfig.format='packed' describes a converted checkpoint; to quantize a float model pass "
                "format='latent' (the default) and call hf_lotion.convert(model) after training."
            )
        layers = quantizable_linears(model, self.modules_to_not_convert)
        check_not_tied(model, layers)
        check_layers(layers, config.to_spec(), check_values=False)
        shapes = [(name, m.out_features, m.in_features) for name, m in layers]
        check_packed_checkpoint(checkpoint_files, shapes, config.bits, config.group_size)
        for name, module in layers:
            packed = PackedLinear.empty_like(
                module,
                config.bits,
                config.group_size,
                device="meta",
                grid=config.grid,
                scale_dtype=config.scale_dtype,
            )
            model.set_submodule(name, packed)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        layers = lotion_layers(model)
        check_layers(layers, self.quantization_config.to_spec())
        for name, layer in layers:
            if layer.weight_scale is None:
                continue
            loaded = getattr(layer.weight_scale, "_is_hf_initialized", False)
            if self.pre_quantized and not loaded:
                logger.warning(
                    "Checkpoint has no learned scales for '%s'; initialising them from absmax.", name
                )
            if not (self.pre_quantized and loaded):
                layer.reset_scales()
        install_lotion_penalty(model, self.quantization_config)
        # Packed CPU layers switch to the int4 kernel's layout once, here, rather than per call.
        for module in model.modules():
            if isinstance(module, PackedLinear):
                module.prepare_cpu_kernel_()
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[None, dict[str, str]]:
        metadata = {
            METADATA_FORMAT_KEY: self.quantization_config.format,
            METADATA_VERSION_KEY: str(FORMAT_VERSION),
        }
        return None, metadata

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """Replace every quantized layer by an `nn.Linear` holding its deploy (RTN) weight."""
        # Snapshot the modules first: the loop swaps modules in the tree it walks.
        for name, layer in list(model.named_modules()):
            if isinstance(layer, LotionLinear):
                weight = layer.deploy_weight()
            elif isinstance(layer, PackedLinear):
                weight = layer.dequantized_weight()
            else:
                continue
            linear = nn.Linear(
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                device=weight.device,
                dtype=dtype or weight.dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(weight)
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            model.set_submodule(name, linear)
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Packed weights are frozen integers: train adapters on them (PEFT), or train the latent model.
        return self.quantization_config.format == "latent"


def install_lotion_penalty(model: nn.Module, config: LotionConfig) -> PenaltyRuntime | None:
    """Wire the method's penalty (LOTION's) into `model`'s loss, or remove it for methods without one."""
    layers = lotion_layers(model)
    penalty = config.build_method().penalty() if layers else None
    return install_penalty(model, penalty, layers, anchor_model_loss)


def _merge_quantization_configs(original):
    """Wrap `AutoHfQuantizer.merge_quantization_configs`: a LotionConfig passed to `from_pretrained` for a
    checkpoint saved by hf_lotion changes the training fields (method and options) and must agree on the
    storage fields; transformers would otherwise ignore it with a warning. Other configs go to `original`.
    """

    def merge(cls, quantization_config, quantization_config_from_args):
        saved = quantization_config
        if isinstance(saved, dict) and saved.get("quant_method") == QUANT_METHOD:
            saved = LotionConfig.from_dict(saved)
        if isinstance(saved, LotionConfig) and isinstance(quantization_config_from_args, LotionConfig):
            return saved.merged_for_reload(quantization_config_from_args)
        # The parsed config, not the dict: parsing twice would repeat from_dict's warnings.
        return original.__func__(cls, saved, quantization_config_from_args)

    merge.hf_lotion_original = original
    return classmethod(merge)


def register_with_transformers() -> None:
    """Register "lotion" with transformers' auto-quantization maps (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LotionConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LotionConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LotionHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LotionHfQuantizer)
    current = AutoHfQuantizer.__dict__["merge_quantization_configs"]
    if not hasattr(current.__func__, "hf_lotion_original"):
        AutoHfQuantizer.merge_quantization_configs = _merge_quantization_configs(current)


def prepare(model: nn.Module, config: LotionConfig | None = None) -> nn.Module:
    """Quantize a model that is already in memory, in place (the *prepare* step of the QAT lifecycle).

    Does what `from_pretrained(..., quantization_config=config)` does, for a model you built or loaded
    yourself: every input is validated (group sizes, finite weights) before any module is swapped. For a
    transformers `PreTrainedModel` the quantizer is attached, so `save_pretrained`, `Trainer` and reloading
    behave exactly as after `from_pretrained`. Plain `nn.Module`s work too (no default exclusions; every
    option applies; a loss computed outside the model gets LOTION's penalty through
    `hf_lotion.add_lotion_penalty`).

    Example:
        >>> from transformers import AutoModelForCausalLM, LlamaConfig
        >>> model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=1, num_attention_heads=4, vocab_size=128))
        >>> model = prepare(model, LotionConfig(bits=4, group_size=32))
        >>> type(model.model.layers[0].mlp.up_proj).__name__
        'LotionLinear'
    """
    config = config if config is not None else LotionConfig()
    if not isinstance(config, LotionConfig):
        raise ValueError(f"prepare() needs a LotionConfig, got {type(config).__name__}.")
    if config.format != "latent":
        raise ValueError(
            f"prepare() needs LotionConfig.format='latent', got {config.format!r}; packed models come from "
            "hf_lotion.convert(model)."
        )
    if not isinstance(model, PreTrainedModel):
        config = copy.deepcopy(config)  # defaults resolve per model; the caller's object stays as it was
        layers = quantizable_linears(model, config.modules_to_not_convert)
        config.resolve_group_size((m.in_features for _, m in layers), type(model).__name__)
        replace_linear_layers(model, config.to_spec(), config.build_method(), config.modules_to_not_convert)
        install_lotion_penalty(model, config)
        return model
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            f"The model is already quantized with {model.hf_quantizer.quantization_config.quant_method!r}; "
            "prepare() takes a full-precision model."
        )
    quantizer = LotionHfQuantizer(config, pre_quantized=False)
    config = quantizer.quantization_config  # the quantizer's own copy, saved with the model
    skipped = quantizer.get_modules_to_not_convert(
        model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None)
    )
    # Validate before the quantizer touches anything (from_pretrained can only check values after loading).
    layers = quantizable_linears(model, skipped)
    check_not_tied(model, layers)
    config.resolve_group_size((m.in_features for _, m in layers), type(model).__name__)
    check_layers(layers, config.to_spec())
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model
