"""Export a quantized model as one GGUF file (llama.cpp, Ollama, LM Studio) that keeps the trained grid exactly.

Each quantized layer is written as `Q4_0` (2-, 3- and 4-bit grids), `Q8_0` (8 bits) or, on request, `TQ2_0`
(ternary 2-bit layers) blocks built from its own integer levels and scales (`hf_lotion.quant.gguf_blocks`),
never re-rounded by llama.cpp's rule. That needs groups (or rows, for `group_size=-1`) a multiple of 32 long
(256 for TQ2_0) and scales that fp16 represents exactly, which `LotionConfig(scale_dtype="float16")`
guarantees; a model that does not fit is refused before anything is written, with the setting that would make
it fit. Tokenizer metadata: `hf_lotion.gguf_tokenizer`. Needs the `gguf` package (`pip install hf-lotion[gguf]`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from .nn.packed_linear import PackedLinear
from .nn.qat_linear import LotionLinear
from .nn.replace import adapter_wrapped_layers
from .quant.gguf_blocks import (
    BLOCK,
    TERNARY_BLOCK,
    fits_blocks,
    fp16_exact,
    gguf_block_type,
    gguf_blocks,
)

logger = logging.getLogger(__name__)

# transformers model_type -> (llama.cpp architecture, whether Q/K rows are permuted for llama.cpp's rope).
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
UNQUANTIZED = ("f16", "f32", "q8_0")
TERNARY = ("q4_0", "tq2_0")
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q8_0": "MOSTLY_Q8_0", "TQ2_0": "MOSTLY_TQ2_0"}
FIX_SCALES = "train with LotionConfig(scale_dtype='float16') (scales that fp16 represents exactly)"


def _import_gguf():
    try:
        import gguf
    except ImportError as error:
        raise ImportError(
            "export_gguf needs the gguf package (llama.cpp's gguf-py): pip install 'hf-lotion[gguf]' or "
            "pip install 'gguf>=0.10'."
        ) from error
    return gguf


@dataclass
class _Layer:
    """One quantized layer as exported: signed levels `(out, in)`, scales `(out, n_groups)`, spec."""

    q: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    kind: str = "Q4_0"  # the GGUF type it is written as


@dataclass
class _Plan:
    """Everything the file will hold, built (and validated) before anything is written."""

    arch: str
    kv: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)  # (GGUFWriter method, args)
    tensors: list[tuple[str, np.ndarray, Any]] = field(default_factory=list)  # (name, data, raw dtype)

    def add(self, method: str, *args: Any) -> None:
        self.kv.append((method, args))


def export_gguf(
    model: PreTrainedModel,
    path: str | os.PathLike,
    tokenizer: Any = None,
    unquantized: str = "f16",
    tokenizer_pre: str | None = None,
    ternary: str = "q4_0",
) -> Path:
    """Write `model` as one GGUF file at `path`, its quantized layers exactly as trained.

    `model` is a QAT model (its eval-mode weights are written: the RTN levels and scales `convert` would pack)
    or a converted one (`hf_lotion.convert`); architectures Llama, Mistral (llama.cpp's `llama`) and Qwen2.
    Quantized layers become `Q4_0` (2-4 bits; a 2- or 3-bit grid is stored at 4 bits, its levels unchanged)
    or `Q8_0` (8 bits) blocks whose `d` is the layer's own scale: llama.cpp's fp32 dequantization `d * q`
    equals the fp32 eval-mode weight bit for bit. That needs group sizes (or in_features, for `group_size=-1`)
    that are multiples of 32 and scales that fp16 represents exactly: train with
    `LotionConfig(scale_dtype="float16")`. (bf16 scales are fp16 values too, except tiny ones; with bf16
    compute the file holds the exact products `d * q`, which the bf16 model rounds to bf16.) Anything else is
    refused with a ValueError before anything is written.

    Args:
        model: a transformers Llama/Mistral/Qwen2 causal LM quantized with hf_lotion.
        path: the `.gguf` file to write (replaced atomically if it exists; its folder is created).
        tokenizer: the model's byte-level BPE tokenizer (a `PreTrainedTokenizerFast`), written as llama.cpp's
            "gpt2" tokenizer (tokens, types, merges, special ids, chat template); `None` writes no vocabulary
            (`tokenizer.ggml.model = "no_vocab"`: llama.cpp then runs on token ids only).
        unquantized: the token embedding and an unquantized output head as `"f16"` (default), `"f32"` (exact)
            or `"q8_0"` (llama.cpp's own Q8_0 rounding, the convention for QAT uploads). Norms and biases are
            always F32.
        tokenizer_pre: llama.cpp's name of the pre-tokenizer (`tokenizer.ggml.pre`); default: "qwen2" for
            Qwen2, "gpt2" for a plain byte-level pre-tokenizer, "smollm" for digits + byte-level, else "default".
        ternary: how 2-bit layers are stored: `"q4_0"` (default: Q4_0 blocks, any 2-bit grid, groups of 32)
            or `"tq2_0"` (TQ2_0, 2.06 bits per weight: needs levels -1, 0, 1 only, as the restricted grid with
            absmax scales gives, and groups a multiple of 256; any other 2-bit layer is refused).

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(
        ...     path, quantization_config=LotionConfig(bits=4, group_size=32, scale_dtype="float16")
        ... )  # doctest: +SKIP
        >>> ...  # train
        >>> hf_lotion.export_gguf(model.eval(), "model-Q4_0.gguf", tokenizer=tokenizer)  # doctest: +SKIP
        PosixPath('model-Q4_0.gguf')
    """
    gguf = _import_gguf()
    if unquantized not in UNQUANTIZED:
        raise ValueError(
            f"export_gguf(unquantized={unquantized!r}) is not supported; allowed: one of {UNQUANTIZED}."
        )
    if ternary not in TERNARY:
        raise ValueError(f"export_gguf(ternary={ternary!r}) is not supported; allowed: one of {TERNARY}.")
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"export_gguf() needs a transformers PreTrainedModel, got {type(model).__name__}.")
    given = Path(path)
    target = Path(os.path.abspath(given))
    _check_target(target)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"export_gguf() does not support model_type={model_type!r}; allowed: one of {tuple(ARCHITECTURES)}."
        )
    arch, permute = ARCHITECTURES[model_type]
    layers = _quantized_layers(model, ternary)
    plan = _Plan(arch)
    _add_hyperparameters(plan, model, layers, gguf)
    _add_tokenizer(plan, model, tokenizer, tokenizer_pre, gguf)
    _add_tensors(plan, model, layers, permute, unquantized, gguf)
    _write(plan, target, gguf)
    logger.info("Wrote %s (%d tensors, %d quantized exactly).", given, len(plan.tensors), len(layers))
    return given


def _check_target(target: Path) -> None:
    """Refuse a path the file cannot be written to, before anything is written."""
    allowed = "a file path in a writable directory (a new file, or an existing file to replace)"
    if target.is_dir():
        raise ValueError(f"export_gguf(path='{target}') is a directory; allowed: {allowed}.")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"export_gguf(path='{target}') cannot be written: '{ancestor}' is not a writable directory; "
            f"allowed: {allowed}."
        )
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"export_gguf(path='{target}') exists and is not writable; allowed: {allowed}.")


def _quantized_layers(model: nn.Module, ternary: str) -> dict[str, _Layer]:
    """Levels and scales of every quantized layer and its GGUF type, after checking that each maps exactly."""
    wrapped = adapter_wrapped_layers(model)
    if wrapped:
        raise ValueError(
            f"export_gguf() got a model with LoRA adapters on '{wrapped[0]}': call "
            "`model = model.merge_and_unload()` first (QAT adapters merge exactly)."
        )
    layers: dict[str, _Layer] = {}
    for name, module in model.named_modules():
        if isinstance(module, LotionLinear):
            q, scales = module.quantize_weight()
            layers[name] = _Layer(q, scales, module.spec.bits, module.spec.group_size)
        elif isinstance(module, PackedLinear):
            layers[name] = _Layer(module.int_weight(), module.weight_scale, module.bits, module.group_size)
    if not layers:
        raise ValueError(
            "export_gguf() found no quantized layer: pass a model quantized with hf_lotion (from_pretrained "
            "with a LotionConfig, or hf_lotion.prepare), trained or converted."
        )
    problems = [problem for name, layer in layers.items() if (problem := _check_layer(name, layer, ternary))]
    if problems:
        more = f" (and {len(problems) - 3} more layers)" if len(problems) > 3 else ""
        raise ValueError(
            "export_gguf() cannot store this model exactly (GGUF blocks of 32 weights, or 256 for TQ2_0, with one "
            f"fp16 scale); nothing was written. {'; '.join(problems[:3])}{more}."
        )
    low = sorted({layer.bits for layer in layers.values() if layer.bits < 4 and layer.kind == "Q4_0"})
    if low:
        logger.warning(
            "%s-bit layers are stored as Q4_0 (4 bits per weight plus the scales): their levels and scales are "
            "exact, but the file is as large as a 4-bit one (llama.cpp has no 2-/3-bit type with one fp16 "
            "scale per 32 weights; ternary 2-bit layers fit TQ2_0, see export_gguf(ternary=...)).",
            "/".join(map(str, low)),
        )
    return layers


def _check_layer(name: str, layer: _Layer, ternary: str) -> str | None:
    """Set `layer.kind`; return why the layer cannot be stored exactly, or None."""
    in_features = layer.q.shape[1]
    layer.kind = gguf_block_type(layer.bits)
    block = BLOCK
    if ternary == "tq2_0" and layer.bits == 2:
        layer.kind, block = "TQ2_0", TERNARY_BLOCK
        if layer.q.numel() and int(layer.q.min()) < -1:
            return (
                f"'{name}': ternary='tq2_0' needs levels -1, 0, 1, but this 2-bit layer uses -2; train with "
                "LotionConfig(grid='restricted') and absmax scales, or export with ternary='q4_0'"
            )
    if not fits_blocks(layer.group_size, in_features, block):
        size = f"group_size={layer.group_size}"
        size += f" (in_features={in_features})" if layer.group_size == -1 else ""
        sizes = "32, 64, 128" if block == BLOCK else "256"
        return (
            f"'{name}': {size} is not a multiple of {block}, the {layer.kind} block; use group_size {sizes} "
            f"(or -1 with in_features a multiple of {block})"
        )
    if not fp16_exact(layer.scales):
        return f"'{name}': its {layer.scales.dtype} scales are not all fp16 values; {FIX_SCALES}"
    return None


def _rope(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(
            f"export_gguf() does not support rope_type={rope_type!r} (rope scaling); allowed: 'default'."
        )
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    return float(10000.0 if theta is None else theta)


def _add_hyperparameters(plan: _Plan, model: PreTrainedModel, layers: dict[str, _Layer], gguf) -> None:
    config = model.config
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"export_gguf() needs hidden_act='silu' (llama.cpp's {plan.arch}); got {act!r}.")
    window = getattr(config, "sliding_window", None)
    if (
        window is not None
        and getattr(config, "use_sliding_window", True)
        and window < config.max_position_embeddings
    ):
        logger.warning(
            "The model uses sliding-window attention (window %d); llama.cpp's %s architecture attends to the "
            "whole context, so outputs differ past %d tokens.",
            window,
            plan.arch,
            window,
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    plan.add("add_name", Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
    plan.add("add_context_length", int(config.max_position_embeddings))
    plan.add("add_embedding_length", int(config.hidden_size))
    plan.add("add_block_count", int(config.num_hidden_layers))
    plan.add("add_feed_forward_length", int(config.intermediate_size))
    plan.add("add_head_count", int(heads))
    plan.add("add_head_count_kv", int(getattr(config, "num_key_value_heads", None) or heads))
    plan.add("add_rope_freq_base", _rope(config))
    plan.add("add_layer_norm_rms_eps", float(config.rms_norm_eps))
    plan.add("add_vocab_size", int(model.get_input_embeddings().weight.shape[0]))
    plan.add("add_rope_dimension_count", int(head_dim))
    if head_dim != config.hidden_size // heads:
        plan.add("add_key_length", int(head_dim))
        plan.add("add_value_length", int(head_dim))
    # general.file_type names the type of most quantized weights (informational: each tensor has its type).
    counts: dict[str, int] = {}
    for layer in layers.values():
        counts[layer.kind] = counts.get(layer.kind, 0) + layer.q.numel()
    plan.add("add_file_type", int(gguf.LlamaFileType[FILE_TYPES[max(counts, key=counts.get)]]))
    plan.add("add_quantization_version", gguf.GGML_QUANT_VERSION)


def _add_tensors(
    plan: _Plan, model: PreTrainedModel, layers: dict[str, _Layer], permute: bool, unquantized: str, gguf
) -> None:
    config = model.config
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == plan.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    skip = {f"{name}.{suffix}" for name in layers for suffix in ("weight_scale", "weight_shape")}
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        # Tied embeddings: llama.cpp uses token_embd for the output when output.weight is absent.
        skip |= {f"{name}.weight" for name, module in model.named_modules() if module is output}
    state = model.state_dict()
    # Module order, weight before bias: the same file whatever layout a layer holds in memory (a packed
    # layer prepared for a CPU kernel lists its weight after its bias).
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}

    def file_order(item: tuple[str, torch.Tensor]) -> tuple[int, int]:
        module_name, _, suffix = item[0].rpartition(".")
        return position.get(module_name, len(position)), {"weight": 0, "bias": 1}.get(suffix, 2)

    for key, tensor in sorted(state.items(), key=file_order):
        if key in skip:
            continue
        module_name = key.rsplit(".", 1)[0]
        value = layers[module_name] if key.endswith(".weight") and module_name in layers else tensor
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(
                f"export_gguf() has no GGUF name for tensor '{key}' of this {config.model_type} model; allowed: "
                "the tensors of a standard transformers Llama/Mistral/Qwen2 model."
            )
        rows = None
        if permute and module_name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            rows = _rope_permutation(heads if module_name.endswith("q_proj") else kv_heads, _rows_of(value))
        if isinstance(value, _Layer):
            q, scales = (value.q, value.scales) if rows is None else (value.q[rows], value.scales[rows])
            kind = gguf.GGMLQuantizationType[value.kind]
            plan.tensors.append((gguf_name, gguf_blocks(q, scales, value.kind, value.group_size), kind))
            continue
        tensor = value.detach().float().cpu()
        if rows is not None:
            tensor = tensor[rows]
        plan.tensors.append((gguf_name, *_unquantized(gguf_name, tensor.numpy(), unquantized, gguf)))


def _rows_of(value: torch.Tensor | _Layer) -> int:
    return value.q.shape[0] if isinstance(value, _Layer) else value.shape[0]


def _rope_permutation(heads: int, rows: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: in each head, rows `j` and `j + d/2` become neighbours (`2j`, `2j + 1`).

    Only rows move, so a quantized layer's groups (along the input features) and their scales move intact.
    """
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _unquantized(name: str, array: np.ndarray, unquantized: str, gguf) -> tuple[np.ndarray, Any]:
    if array.ndim == 1 or unquantized == "f32":
        return array.astype(np.float32), None
    if unquantized == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % BLOCK:
        raise ValueError(
            f"export_gguf(unquantized='q8_0') needs rows a multiple of {BLOCK} long; '{name}' has "
            f"{array.shape[-1]}; allowed here: 'f16' or 'f32'."
        )
    kind = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), kind), kind


def _write(plan: _Plan, target: Path, gguf) -> None:
    """Write to a hidden temporary file beside `target`, then rename it into place; nothing stays on failure
    (not the file, not the folders made for it)."""
    created = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    writer = gguf.GGUFWriter(temporary, plan.arch)
    try:
        for method, args in plan.kv:
            getattr(writer, method)(*args)
        for name, data, kind in plan.tensors:
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, target)
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _add_tokenizer(plan: _Plan, model: PreTrainedModel, tokenizer: Any, pre: str | None, gguf) -> None:
    from .gguf_tokenizer import tokenizer_metadata

    for method, args in tokenizer_metadata(model, tokenizer, plan.arch, pre, gguf):
        plan.add(method, *args)


__all__ = ["ARCHITECTURES", "TERNARY", "UNQUANTIZED", "export_gguf"]
