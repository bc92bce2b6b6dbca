"""Export a converted model as a compressed-tensors `pack-quantized` checkpoint (what vLLM serves)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from .nn.packed_linear import PackedLinear

logger = logging.getLogger(__name__)

# What vLLM's compressed-tensors WNA16 scheme (Marlin kernels) serves. Every setting hf_lotion packs
# (bits 2, 3, 4, 8; any group size) loads in transformers + compressed-tensors, so others still export.
VLLM_SUPPORTED_BITS = (4, 8)
VLLM_SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)  # -1: one scale per output row (strategy "channel")


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


def vllm_serves(bits: int, group_size: int) -> bool:
    """Whether vLLM's compressed-tensors WNA16 kernels serve this (bits, group_size)."""
    return bits in VLLM_SUPPORTED_BITS and group_size in VLLM_SUPPORTED_GROUP_SIZES


def _warn_if_vllm_cannot_serve(bits: int, group_size: int) -> None:
    unserved = []
    if bits not in VLLM_SUPPORTED_BITS:
        unserved.append(f"num_bits={bits} (vLLM serves num_bits {', '.join(map(str, VLLM_SUPPORTED_BITS))})")
    if group_size not in VLLM_SUPPORTED_GROUP_SIZES:
        served = ", ".join("-1 (per channel)" if g == -1 else str(g) for g in VLLM_SUPPORTED_GROUP_SIZES)
        unserved.append(f"group_size={group_size} (vLLM serves group_size {served})")
    if unserved:
        logger.warning(
            "vLLM's compressed-tensors WNA16 kernels will not serve this export: %s. "
            "transformers with the compressed-tensors package still loads it.",
            " and ".join(unserved),
        )


def _previous_export(folder: Path) -> bool:
    """Whether `folder` holds a compressed-tensors checkpoint and nothing else worth keeping: a config.json
    whose quantization_config is compressed-tensors' and no subfolders (checkpoints, logs, a project)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return method == "compressed-tensors" and not any(entry.is_dir() for entry in folder.iterdir())


def _check_replaceable(target: Path) -> None:
    """Refuse a target that the export would clobber but that is not an earlier export (before anything is
    written): the whole folder is replaced, so anything else in it (training checkpoints beside a saved
    model, a project folder) would be lost."""
    allowed = (
        "a new path, an empty directory, or the directory of an earlier compressed-tensors export (a "
        "config.json with quant_method 'compressed-tensors' and no subdirectories)"
    )
    if target.is_symlink():
        # Renaming would replace the link, not the folder it points to.
        raise ValueError(f"save_directory '{target}' is a symbolic link; allowed: {allowed}.")
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise ValueError(
            f"save_directory '{target}' is the working directory or one above it; allowed: {allowed}."
        )
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"save_directory '{target}' exists and is not a directory; allowed: {allowed}.")
    if any(target.iterdir()) and not _previous_export(target):
        raise ValueError(
            f"save_directory '{target}' is a non-empty directory that is not an earlier compressed-tensors "
            f"export, and the export replaces the whole folder; allowed: {allowed}."
        )


def export_compressed_tensors(
    model: PreTrainedModel, save_directory: str | os.PathLike, max_shard_size: str | int = "5GB"
) -> Path:
    """Write `model` (after `hf_lotion.convert`) as a compressed-tensors `pack-quantized` checkpoint.

    The packed layers already use compressed-tensors' bit layout, so this renames each packed `weight` to
    `weight_packed` and rewrites the config: plain transformers with the `compressed-tensors` package
    loads the result without hf_lotion. Every (bits, group_size) loads there, but vLLM serves only
    `VLLM_SUPPORTED_BITS` (4, 8) with `VLLM_SUPPORTED_GROUP_SIZES` (-1 per channel, 32, 64, 128): any
    other setting exports with a logged warning naming it.

    The export replaces `save_directory` as a whole and atomically: the checkpoint is written to a
    hidden folder beside it, the old folder is renamed aside, the new one renamed into place, and the old
    one deleted. Readers see the old checkpoint or the new one (or, for the instant between the two
    renames, none), never a mix such as stale shards; on any failure the old folder is restored
    untouched. Allowed targets: a path that does not exist, an empty directory, or the directory of an
    earlier export (its config.json names compressed-tensors; no subdirectories). Files in it, a tokenizer
    for example, are replaced too, so save the tokenizer after exporting. Anything else (a file, a
    symbolic link, the working directory, a folder holding other things) is refused with a ValueError
    before anything is written.

    Example:
        >>> hf_lotion.convert(model)  # doctest: +SKIP
        >>> hf_lotion.export_compressed_tensors(model, "out-ct", max_shard_size="2GB")  # doctest: +SKIP
        PosixPath('out-ct')
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
    given = Path(save_directory)
    # Absolute, so that "." or "out/.." still has a name and a parent folder to stage beside.
    target = Path(os.path.abspath(given))
    _check_replaceable(target)
    layer = next(m for m in model.modules() if isinstance(m, PackedLinear))
    _warn_if_vllm_cannot_serve(layer.bits, layer.group_size)

    packed_names = {name for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    state_dict = {
        (
            f"{key[: -len('.weight')]}.weight_packed"
            if key.endswith(".weight") and key[: -len(".weight")] in packed_names
            else key
        ): value
        for key, value in model.state_dict().items()
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so that both renames stay on one file system (atomic). os.mkdir, unlike
    # tempfile.mkdtemp (mode 0700), gives the folder the permissions of any folder the user creates.
    staging = target.parent / f".{target.name}.export-{uuid.uuid4().hex[:12]}"
    backup = staging.with_name(f"{staging.name}.old")
    os.mkdir(staging)
    saved_quantizer = model.hf_quantizer
    saved_config = model.config.quantization_config
    try:
        try:
            # Without a quantizer attached, save_pretrained writes the given state dict and config as is.
            model.hf_quantizer = None
            model.config.quantization_config = quantization_config
            model.save_pretrained(staging, state_dict=state_dict, max_shard_size=max_shard_size)
        finally:
            model.hf_quantizer = saved_quantizer
            model.config.quantization_config = saved_config
        had_target = target.exists()
        if had_target:
            os.rename(target, backup)
        try:
            os.rename(staging, target)
        except BaseException:
            if had_target:
                try:
                    os.rename(backup, target)
                except OSError:
                    logger.error(
                        "Export failed and the previous export could not be restored: it is at '%s'.", backup
                    )
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap
    if had_target:
        try:
            shutil.rmtree(backup)
        except OSError as error:
            logger.warning(
                "Exported to '%s' but could not delete the previous export at '%s': %s", target, backup, error
            )
    return given
