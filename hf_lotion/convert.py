"""The *convert* step of the QAT lifecycle: latent QAT layers -> packed low-bit layers, in place."""

from __future__ import annotations

import logging

from torch import nn

from .config import LotionConfig
from .nn.packed_linear import PackedLinear
from .nn.penalty import remove_penalty
from .nn.qat_linear import LotionLinear
from .nn.replace import adapter_wrapped_layers, full_precision_summary, lotion_layers, unconverted_weights

logger = logging.getLogger(__name__)


def convert(model: nn.Module) -> nn.Module:
    """Pack every `LotionLinear` of `model` into a `PackedLinear`, in place, and return the model.

    Each layer keeps exactly the weights its eval mode used (round-to-nearest with the current scales),
    so the converted model's outputs are bit-identical to the eval-mode QAT model (on the reference path;
    CPU layers the int4 kernel takes are prepared for it, `PackedLinear.prepare_cpu_kernel_`, whose products
    agree to rounding). For a transformers
    model, `config.quantization_config` becomes a new packed config (storage fields and the method's name;
    the config object the model was quantized with is left as it was), so `save_pretrained` writes packed
    safetensors and `from_pretrained` (after `import hf_lotion`) rebuilds packed layers directly.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LotionConfig(bits=4))  # doctest: +SKIP
        >>> ...  # train
        >>> hf_lotion.convert(model)  # doctest: +SKIP
        >>> model.save_pretrained("out")  # doctest: +SKIP
    """
    layers = lotion_layers(model)
    wrapped = adapter_wrapped_layers(model, (LotionLinear,))
    if wrapped:
        raise ValueError(
            f"convert() got a model with LoRA adapters on its quantized layers ({wrapped[0]}, ...): packing "
            "under the adapters would break them. Call `model = model.merge_and_unload()` first (QAT adapters "
            "merge exactly), then hf_lotion.convert(model)."
        )
    if not layers:
        raise ValueError(
            "convert() found no LotionLinear layer to pack: pass a model quantized with hf_lotion in the "
            "latent format (from_pretrained with a LotionConfig, or hf_lotion.prepare); a converted model "
            "is already packed."
        )
    packed_layers = []
    for name, layer in layers:
        packed_layers.append(PackedLinear.from_qat(layer))
        model.set_submodule(name, packed_layers[-1])
    remove_penalty(model)
    model_config = getattr(model, "config", None)
    config = getattr(model_config, "quantization_config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(config, LotionConfig):
        packed = config.packed()
        model_config.quantization_config = packed
        if quantizer is not None:
            quantizer.quantization_config = packed
    packed_params = sum(layer.weight.numel() for _, layer in layers)
    on_kernel = sum(layer.prepare_cpu_kernel_() for layer in packed_layers)
    excluded = getattr(quantizer, "modules_to_not_convert", None)
    logger.info(
        "Packed %d layers (%s parameters; %d run on a CPU low-bit kernel). %s",
        len(layers),
        f"{packed_params:,}",
        on_kernel,
        full_precision_summary(model, unconverted_weights(model, excluded)),
    )
    return model
