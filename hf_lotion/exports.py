"""Export a converted model as a compressed-tensors `pack-quantized` checkpoint (what vLLM serves)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from .nn.packed_linear import PackedLinear


def compressed_tensors_config(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` for config.json describing `model`'s packed layers to compressed-tensors."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    specs = {(m.bits, m.group_size) for m in packed}
    if len(specs) != 1:
        raise ValueError(
            f"compressed-tensors export needs one (bits, group_size) for all layers, found {sorted(specs)}."
        )
    ((bits, group_size),) = specs
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "dynamic": False,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
    }
    # Every nn.Linear that is not packed (the output head by default) stays dense.
    ignore = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ignore,
    }


def export_compressed_tensors(
    model: PreTrainedModel, save_directory: str | os.PathLike, max_shard_size: str | int = "5GB"
) -> Path:
    """Write `model` (after `hf_lotion.convert`) as a compressed-tensors `pack-quantized` checkpoint.

    The packed layers already use compressed-tensors' bit layout, so this renames each packed `weight` to
    `weight_packed` and rewrites the config: plain transformers with the `compressed-tensors` package
    loads the result without hf_lotion. Files are written to a temporary folder and moved into place at
    the end, so an interrupted export leaves no half-written checkpoint.

    Example:
        >>> hf_lotion.convert(model)  # doctest: +SKIP
        >>> hf_lotion.export_compressed_tensors(model, "out-ct")  # doctest: +SKIP
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"export_compressed_tensors() needs a transformers PreTrainedModel, got {type(model).__name__}."
        )
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError(
            "export_compressed_tensors() needs a converted model: call hf_lotion.convert(model) first."
        )
    quantization_config = compressed_tensors_config(model)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory '{target}' exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)

    packed_names = {name for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    state_dict = {
        (
            f"{key[: -len('.weight')]}.weight_packed"
            if key.endswith(".weight") and key[: -len(".weight")] in packed_names
            else key
        ): value
        for key, value in model.state_dict().items()
    }
    saved_quantizer = model.hf_quantizer
    saved_config = model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # Without a quantizer attached, save_pretrained writes the given state dict and config as they are.
        model.hf_quantizer = None
        model.config.quantization_config = quantization_config
        model.save_pretrained(staging, state_dict=state_dict, max_shard_size=max_shard_size)
        target.mkdir(exist_ok=True)
        for file in staging.iterdir():
            os.replace(file, target / file.name)
    finally:
        model.hf_quantizer = saved_quantizer
        model.config.quantization_config = saved_config
        shutil.rmtree(staging, ignore_errors=True)
    return target
