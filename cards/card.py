"""The model card of a model quantized with hf_lotion: Hub metadata, a readable body, and its plots.

`build_card(model, facts)` renders `template.md` with huggingface_hub's `ModelCard.from_template`;
`save_card(model, directory, facts)` writes the card and its PNG plots into a model folder (each file under
a temporary name, then renamed), ready for `upload_folder`. What the card says comes from the model (its
`LotionConfig` and layers) and from `CardFacts` (what the model cannot know: its base, data, training run
and evaluation). A fact that is not given is left out, with the sentence or table around it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from hf_lotion import __version__
from hf_lotion.config import LotionConfig
from hf_lotion.exports import VLLM_SUPPORTED_BITS, VLLM_SUPPORTED_GROUP_SIZES, vllm_serves
from hf_lotion.methods import method_class
from hf_lotion.nn import LotionLinear, PackedLinear
from hf_lotion.nn.replace import unconverted_weights
from hf_lotion.quant.grid import int_range
from hf_lotion.quant.packing import packed_words

from . import plots

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).with_name("template.md")
LIBRARY_TAG = "hf-lotion"
PLOTS_DIR = "plots"
LOSS_PLOT = "loss.png"
WEIGHTS_PLOT = "weights.png"
PLOT_FILES = (LOSS_PLOT, WEIGHTS_PLOT)


@dataclass
class CardFacts:
    """What a model card says that the model itself cannot know. Every field is optional.

    Args:
        base_model: Hub id (or local name) of the model it was quantized from. A Hub id goes into the
            metadata with `base_model_relation: quantized`; a local path is only named in the text.
        datasets: Hub ids (or names) of the training data.
        license: a Hub license id, e.g. "apache-2.0".
        language: ISO 639 codes.
        training: the run, e.g. `{"steps": 1000, "tokens": 65_536_000, "learning_rate": 2e-3, "data": "..."}`;
            any other key is listed as well (`batch_size` as "batch size").
        results: eval metrics, `{"full_precision": 1.92, "rtn": 2.03, "this_model": 1.95, "metric": "eval
            loss", "dataset": "..."}` (lower is better). The card reports the share of RTN's degradation
            that training recovered, `(rtn - this_model) / (rtn - full_precision)`.
        log_history: `transformers.Trainer.state.log_history`, for the loss curves.
        repo_id: the Hub repository, used as the card's title and in the loading snippet.
        method_options: the QAT method's options (`LotionConfig.method_options()` before `convert`): a
            packed config keeps only the storage fields and the method's name, so LOTION's lambda or
            StableQAT's amplitudes reach the card of a converted model only this way.
    """

    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    language: list[str] = field(default_factory=list)
    training: dict | None = None
    results: dict | None = None
    log_history: list[dict] | None = None
    repo_id: str | None = None
    method_options: dict | None = None


# -- formatting ----------------------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    """`value` as a finite float, or None (missing, not a number, NaN or inf)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: object) -> str | None:
    """A non-empty string, or None."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _cell(text: str) -> str:
    """`text` safe inside a markdown table cell."""
    return " ".join(text.replace("|", "\\|").split())


def _count(n: float) -> str:
    """1234 -> '1,234'; 1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{round(n):,}"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{round(n)} bytes"


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%" if share == 1 else f"{100 * share:.1f}%"


def _as_list(value: object) -> list:
    """A list of names from a list, a single string (not its characters) or nothing."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _loss(value: float) -> str:
    return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.3g}"


def _delta(value: float) -> str:
    """A signed difference of losses; one that rounds to zero reads 0.000, not -0.000."""
    text = f"{value:+.3f}"
    return "0.000" if float(text) == 0 else text


def _value(value: object) -> str | None:
    """A training fact as text (None when missing or not finite)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:g}"
    if isinstance(value, (list, tuple)):
        parts = [p for p in (_value(v) for v in value) if p is not None]
        return ", ".join(parts) or None
    if isinstance(value, Mapping):
        parts = [f"{k}={v}" for k, v in ((k, _value(v)) for k, v in value.items()) if v is not None]
        return ", ".join(parts) or None
    text = _text(value)
    return " ".join(text.split()) if text else None  # one line: a list item or a table cell


# namespace/name: ids without a namespace ("gpt2") are legacy on the Hub and cannot be told from local names.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repository id (`namespace/name`) and is not a local path, else None."""
    if not name or not _HUB_ID.match(name) or ".." in name or name.endswith((".git", ".")):
        return None
    if len(name) > 96 or os.path.exists(name):
        return None
    return name


def _or(words: list[str], conjunction: str = "or") -> str:
    """['a', 'b', 'c'] -> 'a, b or c'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def _hub_link(repo_id: str, kind: str = "") -> str:
    prefix = f"{kind}/" if kind else ""
    return f"[{repo_id}](https://huggingface.co/{prefix}{repo_id})"


# -- what the model says about itself ----------------------------------------------------------------------------

METHODS = {
    "lotion": (
        "LOTION",
        "[LOTION](https://arxiv.org/abs/2510.08757)",
        "the latent weights trained on the expected loss under randomized rounding (a curvature-weighted "
        "rounding-noise penalty), then rounded to nearest",
    ),
    "stableqat": (
        "StableQAT",
        "[StableQAT](https://arxiv.org/abs/2601.19320)",
        "a fake-quantized forward whose backward goes through a smooth Fourier-series surrogate of rounding",
    ),
    "ste": (
        "STE",
        "STE",
        "a fake-quantized forward with a straight-through backward",
    ),
    "full_precision": (
        "RTN",
        "full-precision training",
        "trained in full precision and rounded to nearest (RTN), the baseline QAT methods are measured against",
    ),
}

OPTION_LABELS = {
    "lotion_lambda": "LOTION lambda (penalty strength)",
    "curvature": "curvature estimate",
    "curvature_beta": "curvature EMA decay",
    "curvature_every": "curvature estimated every (optimizer steps)",
    "stableqat_amplitudes": "StableQAT surrogate amplitudes",
    "learned_scales": "learned scales",
}

CURVATURES = {"fisher": "per-token empirical Fisher of each layer"}


@dataclass
class _Quantization:
    packed: bool
    method: str
    bits: int
    group_size: int
    grid: str
    scale_dtype: torch.dtype
    options: dict[str, Any]


def _describe_quantization(model: nn.Module, facts: CardFacts) -> _Quantization:
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    latent = [m for m in model.modules() if isinstance(m, LotionLinear)]
    if not packed and not latent:
        raise ValueError(
            "build_card needs a model quantized with hf_lotion: converted (hf_lotion.convert, PackedLinear "
            "layers) or in training (LotionLinear layers); this one has neither."
        )
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, Mapping):
        with contextlib.suppress(Exception):
            config = LotionConfig.from_dict(dict(config))
    if packed:
        first = packed[0]
        bits, group_size, grid, dtype = first.bits, first.group_size, first.grid, first.weight_scale.dtype
    else:
        first = latent[0]
        spec = first.spec
        bits, group_size, grid, dtype = spec.bits, spec.group_size, spec.grid, first.weight.dtype
    if isinstance(config, LotionConfig):
        method = config.method
        grid = config.grid or grid
    elif latent:
        method = latent[0].method.name
    else:
        method = "unknown"
    options: dict[str, Any] = {}
    if latent and not packed:
        options = dict(latent[0].method.option_values())
    for name, value in (facts.method_options or {}).items():
        options[name] = value
    # A method without a learned_scales option always uses absmax scales.
    with contextlib.suppress(Exception):
        if "learned_scales" not in method_class(method).option_names():
            options.setdefault("learned_scales", bool(method_class(method).learned_scales))
    return _Quantization(bool(packed), method, bits, group_size, grid, dtype, options)


def _quantization_items(q: _Quantization) -> list[tuple[str, str]]:
    low, high = int_range(q.bits)
    label = METHODS.get(q.method, (q.method, f"`{q.method}`", ""))
    items = [("method", f"{label[1]}: {label[2]}" if label[2] else label[1])]
    items.append(("weights", f"{q.bits}-bit signed integers, levels {low} to {high}"))
    if q.group_size == -1:
        items.append(("group size", "one scale per output row (-1)"))
    else:
        items.append(
            ("group size", f"{q.group_size} (one scale per {q.group_size} consecutive input features)")
        )
    grids = {
        "full": f"full range: scale = absmax / {2 ** (q.bits - 1) - 0.5:g}, all {2**q.bits} levels",
        "restricted": f"restricted: scale = absmax / {2 ** (q.bits - 1) - 1}, {2**q.bits - 1} levels "
        f"(level {low} unused)",
    }
    items.append(("grid", grids.get(q.grid, q.grid)))
    dtype = str(q.scale_dtype).removeprefix("torch.")
    learned = q.options.get("learned_scales")
    if learned is True:
        items.append(("scales", f"learned during training (LSQ), stored in {dtype}"))
    elif learned is False:
        items.append(("scales", f"absmax of each group, stored in {dtype}"))
    else:
        items.append(("scales", f"stored in {dtype}"))
    items.append(("activations", "not quantized (weight-only quantization)"))
    for name, value in q.options.items():
        if name == "learned_scales":
            continue
        if name == "curvature":
            text = CURVATURES.get(str(value), _value(value))
        elif name == "stableqat_amplitudes":
            text = _value(list(value)) if value else "none (plain STE)"
        else:
            text = _value(value)
        if text is not None:
            items.append((OPTION_LABELS.get(name, name.replace("_", " ")), text))
    return items


def _group_names(names: Iterable[str], limit: int = 12) -> str:
    """Module names with repeated blocks folded: "`self_attn.q_proj`, `mlp.up_proj` in each of the 24
    `model.layers`" for the modules every block has; names outside repeated blocks are listed as they are."""
    names = list(names)
    blocks: dict[str, dict[str, set[str]]] = {}  # prefix -> suffix -> block indices
    single: list[str] = []
    for name in names:
        match = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
        if match:
            prefix, index, suffix = match.groups()
            blocks.setdefault(prefix, {}).setdefault(suffix, set()).add(index)
        else:
            single.append(name)
    shown: list[str] = []
    for prefix, suffixes in blocks.items():
        every = set().union(*suffixes.values())
        common = [suffix for suffix, indices in suffixes.items() if indices == every]
        if len(every) > 1 and common:
            listed = _or([f"`{s}`" for s in common[:limit]], "and")
            more = f" and {len(common) - limit} more" if len(common) > limit else ""
            shown.append(f"{listed}{more} in each of the {len(every)} `{prefix}`")
        for suffix, indices in suffixes.items():
            if len(every) <= 1 or indices != every:
                shown += [f"`{prefix}.{i}.{suffix}`" for i in sorted(indices, key=int)]
    shown += [f"`{name}`" for name in single]
    if len(shown) > limit:
        shown = [*shown[:limit], f"and {len(shown) - limit} more"]
    return "; ".join(shown)


@dataclass
class _Parts:
    """Parameter counts of the dense model by what happened to them, and bytes stored."""

    quantized: list[str] = field(default_factory=list)
    quantized_params: int = 0
    quantized_bytes: int = 0  # packed words + scales + shapes (or what convert would store)
    kept: list[str] = field(default_factory=list)
    kept_params: int = 0
    embeddings: list[str] = field(default_factory=list)
    embedding_params: int = 0
    other_params: int = 0
    other_bytes: int = 0  # every other tensor of the state dict, at its dtype
    other_dtypes: Counter = field(default_factory=Counter)

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.kept_params + self.embedding_params + self.other_params


def _count_parts(model: nn.Module) -> _Parts:
    parts = _Parts()
    seen: set[int] = set()
    linear_like = {name for name, *_ in unconverted_weights(model)}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (PackedLinear, LotionLinear)):
            parts.quantized.append(module_name)
            out_features, in_features = module.out_features, module.in_features
            parts.quantized_params += out_features * in_features
            if isinstance(module, PackedLinear):
                # The checkpoint's bytes (packed words), whichever layout the layer runs in memory.
                parts.quantized_bytes += out_features * packed_words(in_features, module.bits) * 4
                seen.add(id(module.weight))
                for tensor in (module.weight_scale, module.weight_shape):
                    parts.quantized_bytes += tensor.numel() * tensor.element_size()
                    seen.add(id(tensor))
            else:
                bits, group_size = module.spec.bits, module.spec.group_size
                groups = 1 if group_size == -1 else in_features // group_size
                parts.quantized_bytes += out_features * packed_words(in_features, bits) * 4
                parts.quantized_bytes += out_features * groups * module.weight.element_size() + 16
                seen.add(id(module.weight))
                if module.weight_scale is not None:
                    seen.add(id(module.weight_scale))
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = param.numel()
            parts.other_bytes += n * param.element_size()
            parts.other_dtypes[str(param.dtype).removeprefix("torch.")] += n
            if (isinstance(module, nn.Linear) and name == "weight") or f"{prefix}{name}" in linear_like:
                parts.kept.append(module_name)
                parts.kept_params += n
            elif isinstance(module, nn.Embedding):
                parts.embeddings.append(module_name)
                parts.embedding_params += n
            else:
                parts.other_params += n
        for name, buffer in module.named_buffers(recurse=False):
            persistent = name not in getattr(module, "_non_persistent_buffers_set", set())
            if id(buffer) in seen or not persistent:
                continue
            seen.add(id(buffer))
            parts.other_bytes += buffer.numel() * buffer.element_size()
            parts.other_params += buffer.numel()
    return parts


def _parts_rows(parts: _Parts, bits: int) -> list[list[str]]:
    total = max(parts.total_params, 1)
    rows = []

    def add(what: str, modules: str, params: int) -> None:
        if params:
            rows.append([what, modules, _count(params), _percent(params / total)])

    add(f"linear layers, {bits}-bit", _group_names(parts.quantized), parts.quantized_params)
    add("linear layers kept in full precision", _group_names(parts.kept), parts.kept_params)
    add("embeddings (full precision)", _group_names(parts.embeddings), parts.embedding_params)
    add("norms, biases and other (full precision)", "", parts.other_params)
    return rows


def _size(parts: _Parts, packed: bool) -> dict[str, str] | None:
    bf16 = 2 * parts.total_params
    stored = parts.quantized_bytes + parts.other_bytes
    if not bf16 or not stored:
        return None
    dtypes = ", ".join(sorted(parts.other_dtypes)) or "bf16"
    return {
        "label": "this checkpoint" if packed else "after `hf_lotion.convert`",
        "stored": _bytes(stored),
        "bf16": _bytes(bf16),
        "ratio": f"{stored / bf16:.2f}x",
        "layers_stored": _bytes(parts.quantized_bytes),
        "layers_bf16": _bytes(2 * parts.quantized_params),
        "layers_ratio": f"{parts.quantized_bytes / max(2 * parts.quantized_params, 1):.2f}x",
        "rest_dtypes": dtypes,
    }


def _is_causal_lm(model: nn.Module) -> bool:
    names = [type(model).__name__, *(getattr(getattr(model, "config", None), "architectures", None) or [])]
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:
        known = set()
    return any(name in known or name.endswith("ForCausalLM") for name in names)


# -- facts given by the caller ------------------------------------------------------------------------------

TRAINING_LABELS = {
    "steps": "optimizer steps",
    "tokens": "training tokens",
    "learning_rate": "learning rate",
    "data": "data",
}


def _training_items(facts: CardFacts) -> list[tuple[str, str]]:
    training = dict(facts.training or {})
    if "steps" not in training:
        steps = [s for s in (_number(e.get("step")) for e in facts.log_history or ()) if s is not None]
        if steps:
            training["steps"] = int(max(steps))
    items = []
    for key, value in training.items():
        number = _number(value) if key == "tokens" else None
        text = _count(number) if number is not None else _value(value)
        if text is not None:
            label = TRAINING_LABELS.get(key, str(key).replace("_", " "))
            items.append((label, text))
    return items


@dataclass
class _Results:
    metric: str
    dataset: str | None
    rows: list[list[str]]
    this_model: float | None
    share: float | None
    note: str | None


def _results(facts: CardFacts, q: _Quantization) -> _Results | None:
    given = facts.results or {}
    fp, rtn, this = (_number(given.get(k)) for k in ("full_precision", "rtn", "this_model"))
    if fp is None and rtn is None and this is None:
        return None
    metric = _text(given.get("metric")) or "eval loss"
    label = METHODS.get(q.method, (q.method,))[0]
    rows = []
    for name, value, is_reference in (
        ("full precision (before quantization)", fp, True),
        (f"round-to-nearest {q.bits}-bit (RTN)", rtn, False),
        (f"this model ({label} {q.bits}-bit)", this, False),
    ):
        if value is not None:
            change = "" if fp is None or is_reference else _delta(value - fp)
            rows.append([name, _loss(value), change])
    share = note = None
    if fp is not None and rtn is not None and this is not None:
        if rtn - fp > 0:
            share = (rtn - this) / (rtn - fp)
        else:
            note = f"RTN lost nothing against full precision here ({_loss(rtn)} vs {_loss(fp)}), so there was no degradation to recover."
    if fp is None:
        for row in rows:
            row.pop()
    return _Results(metric, _text(given.get("dataset")), rows, this, share, note)


def _share_sentence(results: _Results) -> str | None:
    if results.share is None:
        return results.note
    share = _percent(results.share)
    if results.share > 1:
        return f"This model recovers {share} of RTN's degradation: it is better than the full-precision model on this metric."
    if results.share < 0:
        return f"Share of RTN's degradation recovered: {share}: this model is worse than plain round-to-nearest on this metric."
    return f"This model recovers **{share}** of RTN's degradation, `(rtn - this) / (rtn - full precision)`."


def _model_index(
    results: _Results | None, facts: CardFacts, name: str, pipeline_tag: str | None
) -> list[EvalResult] | None:
    if results is None or results.this_model is None:
        return None
    dataset = results.dataset or (facts.datasets[0] if len(facts.datasets) == 1 else None)
    if dataset is None:
        return None
    # The Hub expects an identifier as the dataset's type (a Hub id where there is one) and any text as its name.
    dataset_type = _hub_id(dataset) or re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-")[:64] or "custom"
    return [
        EvalResult(
            task_type=pipeline_tag or "other",
            dataset_type=dataset_type,
            dataset_name=dataset,
            metric_type="loss" if "loss" in results.metric.lower() else re.sub(r"\W+", "_", results.metric),
            metric_name=results.metric,
            metric_value=round(results.this_model, 4),
        )
    ]


# -- the card ----------------------------------------------------------------------------------------------------


def _tags(q: _Quantization) -> list[str]:
    tags = [LIBRARY_TAG]
    if q.method == "full_precision":
        tags.append("rtn")
    else:
        tags += [q.method.replace("_", "-"), "qat"]
    tags += [f"{q.bits}-bit", "quantized"]
    return tags


def _context(model: nn.Module, facts: CardFacts, plot_files: Mapping[str, str]) -> tuple[ModelCardData, dict]:
    q = _describe_quantization(model, facts)
    base_hub = _hub_id(_text(facts.base_model))
    base_text = _text(facts.base_model)
    causal = _is_causal_lm(model)
    pipeline_tag = "text-generation" if causal else None
    method_short = METHODS.get(q.method, (q.method,))[0]
    repo_id = _text(facts.repo_id)
    base_short = base_text.rstrip("/").rsplit("/", 1)[-1] if base_text else None
    if repo_id:
        name = repo_id.rsplit("/", 1)[-1]
        title = repo_id
    elif base_short:
        name = f"{base_short}-{method_short.lower()}-{q.bits}bit"
        title = f"{base_short}, {q.bits}-bit {method_short}"
    else:
        name = f"{method_short.lower()}-{q.bits}bit"
        title = f"{q.bits}-bit {method_short} model"
    datasets = [d for d in (_text(d) for d in _as_list(facts.datasets)) if d]
    languages = [code for code in (_text(c) for c in _as_list(facts.language)) if code]
    results = _results(facts, q)
    eval_results = _model_index(results, facts, name, pipeline_tag)
    data = ModelCardData(
        base_model=base_hub,
        datasets=datasets or None,
        language=languages or None,
        library_name="transformers",
        license=_text(facts.license),
        pipeline_tag=pipeline_tag,
        tags=_tags(q),
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    if base_hub:
        data["base_model_relation"] = "quantized"
    parts = _count_parts(model)
    method_link = METHODS.get(q.method, (q.method, f"`{q.method}`"))[1]
    if base_hub:
        base = _hub_link(base_hub)
    elif base_text:
        base = f"`{base_text}`"
    else:
        base = None
    vllm = vllm_serves(q.bits, q.group_size)
    group_text = "one scale per row" if q.group_size == -1 else f"group size {q.group_size}"
    results_where = results_single = None
    if results is not None:
        where = f" on {results.dataset}" if results.dataset else ""
        results_where = f"{results.metric[:1].upper()}{results.metric[1:]}{where}; lower is better."
        name, value = results.rows[0][:2]
        results_single = f"{name[:1].upper()}{name[1:]}: {results.metric} {value}{where} (lower is better)."
    context = {
        "title": title,
        "intro": _intro(q, base, method_link, group_text),
        "causal": causal,
        "auto_class": "AutoModelForCausalLM" if causal else "AutoModel",
        "results_change": bool(results and results.rows and len(results.rows[0]) == 3),
        "results_where": results_where,
        "results_single": results_single,
        "metric_header": _cell(results.metric) if results else None,
        "version": __version__,
        "packed": q.packed,
        "bits": q.bits,
        "group_text": group_text,
        "repo": repo_id or "path/to/this/model",
        "repo_known": bool(repo_id),
        "vllm": vllm,
        "vllm_bits": _or([f"{b}-bit" for b in VLLM_SUPPORTED_BITS]),
        "vllm_groups": _or(
            ["-1 (one scale per row)" if g == -1 else str(g) for g in VLLM_SUPPORTED_GROUP_SIZES]
        ),
        "quantization": _quantization_items(q),
        "parts": _parts_rows(parts, q.bits),
        "size": _size(parts, q.packed),
        "training": _training_items(facts),
        "datasets": [_hub_link(d, "datasets") if _hub_id(d) else d for d in datasets],
        "results": results,
        "share_sentence": _share_sentence(results) if results else None,
        "loss_plot": plot_files.get(LOSS_PLOT),
        "weights_plot": plot_files.get(WEIGHTS_PLOT),
        "weights_caption": plot_files.get("weights_caption"),
        "loss_caption": plot_files.get("loss_caption"),
    }
    return data, context


def _intro(q: _Quantization, base: str | None, method_link: str, group_text: str) -> str:
    what = (
        f"A {q.bits}-bit weight-only quantization of {base}"
        if base
        else f"A {q.bits}-bit weight-only quantized model"
    )
    if q.method == "full_precision":
        how = "trained in full precision, then rounded to nearest (RTN)"
    else:
        how = f"trained quantization-aware with {method_link}"
    how += " in hf-lotion"
    dtype = str(q.scale_dtype).removeprefix("torch.")
    scale = (
        "one scale per output row" if q.group_size == -1 else f"one scale per group of {q.group_size} weights"
    )
    stored = (
        f"Its linear layers are stored as {q.bits}-bit integers plus {scale} ({dtype})."
        if q.packed
        else f"Its linear layers round to {q.bits}-bit integers with {scale}."
    )
    return f"{what}, {how}. {stored}"


def _tidy(text: str) -> str:
    """Collapse the blank lines that template blocks leave, outside code blocks."""
    lines, blank, fenced = [], 0, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not line.strip() and not fenced:
            blank += 1
            if blank > 1:
                continue
        else:
            blank = 0
        lines.append(line.rstrip())
    return "\n".join(lines).strip() + "\n"


def _render(model: nn.Module, facts: CardFacts | None, plot_files: Mapping[str, str]) -> ModelCard:
    data, context = _context(model, facts or CardFacts(), plot_files)
    card = ModelCard.from_template(data, template_path=str(TEMPLATE_PATH), **context)
    # Parse once more from the tidied text, so what is returned is exactly what a reader loads.
    return ModelCard(_tidy(card.content))


def build_card(model: nn.Module, facts: CardFacts | None = None) -> ModelCard:
    """The model card of `model` (after `hf_lotion.convert`, or a latent QAT model), without plots.

    Plots are files beside the card: `save_card` draws them and links them in the card it writes.

    Example:
        >>> card = build_card(model, CardFacts(base_model="HuggingFaceTB/SmolLM2-135M", repo_id="me/smol-4bit"))  # doctest: +SKIP
        >>> card.data.base_model_relation  # doctest: +SKIP
        'quantized'
    """
    return _render(model, facts, {})


def _write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(temporary path)` beside `path`, then rename it over `path`: readers see old or new, never half."""
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return path


def _loss_caption(series: Mapping[str, list], references: Mapping[str, float]) -> str:
    shown = []
    if "loss" in series:
        smoothed = len(series["loss"]) >= plots.SMOOTH_FROM
        shown.append(
            "Blue: training loss" + (" (faint: as logged; solid: its moving average)." if smoothed else ".")
        )
    if "eval_loss" in series:
        shown.append("Red: eval loss of the quantized model, which is what this checkpoint runs.")
    if "eval_latent_loss" in series:
        shown.append("Dashed: eval loss of the unrounded latent weights.")
    if references:
        shown.append(f"Dotted: eval loss of {_or(list(references), 'and of')}, for reference.")
    return "Loss against the optimizer step. " + " ".join(shown)


def _weights_caption_packed(counts: Mapping[int, plots.LevelCounts]) -> str:
    parts = []
    for entry in counts.values():
        low, high = entry.end_levels
        text = (
            f"at {entry.bits} bits, {_percent(entry.share(0))} of the weights are 0 and "
            f"{_percent(entry.end_share)} sit at the end levels {low} and {high}"
        )
        if high - low >= 4:
            neighbours = entry.share(low + 1) + entry.share(high - 1)
            text += f" ({_percent(neighbours)} at their neighbours {low + 1} and {high - 1})"
        parts.append(text)
    text = (
        "Share of the weights at each integer level. A packed weight lies on its grid by construction (its "
        "distance to the nearest grid point is zero), so the plot shows instead how the weights use the grid: "
        + "; ".join(parts)
        + "."
    )
    if any(entry.bits > 2 for entry in counts.values()):
        text += (
            " End levels standing well above their neighbours mean the scales clip many weights (learned "
            "scales trade clipping for a finer step)."
        )
    return text


def _weights_caption_latent(histogram: plots.DistanceHistogram) -> str:
    text = (
        "Distance of each latent weight to the grid point it rounds to, in grid steps (|w/s - q|). Weights "
        "that ignore the grid spread evenly over [0, 0.5] (dotted line); a peak near 0 means training pulled "
        f"them onto grid points, where rounding changes nothing. Here {_percent(histogram.share_within(0.1))} "
        "lie within 0.1 of a grid point, against 20% for weights that ignore the grid."
    )
    if histogram.pinned:
        text += (
            " Each group's largest weight is left out: its absmax scale puts it at a fixed distance "
            "whatever training did."
        )
    if histogram.beyond:
        text += (
            f" {_percent(histogram.beyond / histogram.total)} lie further than 0.5: their scale clips them."
        )
    return text


def save_card(model: nn.Module, directory: str | os.PathLike, facts: CardFacts | None = None) -> list[Path]:
    """Write `README.md` and its plots (`plots/loss.png`, `plots/weights.png`) into `directory`.

    Each file is written under a temporary name and renamed into place, plots first, so the card never
    links a missing plot. Plots need matplotlib (`pip install "hf-lotion[cards]"`); without it the card is
    written without them and a warning says so. A plot this call does not draw (no log history) is
    removed if an earlier call left it, so the folder holds no plot the card does not show.
    Returns the paths written.
    """
    facts = facts or CardFacts()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    drawn: dict[str, str] = {}
    series = plots.loss_series(facts.log_history)
    has_points = sum(len(points) for points in series.values()) >= 2
    if not plots.matplotlib_available():
        logger.warning(
            "matplotlib is not installed: the model card is written without plots "
            '(pip install "hf-lotion[cards]" to get them).'
        )
    else:
        plot_dir = directory / PLOTS_DIR
        plot_dir.mkdir(exist_ok=True)
        if has_points:
            references = {}
            results = facts.results or {}
            for key, label in (("full_precision", "full precision"), ("rtn", "RTN")):
                value = _number(results.get(key))
                if value is not None:
                    references[label] = value
            written.append(
                _write_atomic(plot_dir / LOSS_PLOT, lambda p: plots.plot_losses(series, p, references))
            )
            drawn[LOSS_PLOT] = f"{PLOTS_DIR}/{LOSS_PLOT}"
            drawn["loss_caption"] = _loss_caption(series, references)
        packed = any(isinstance(m, PackedLinear) for m in model.modules())
        if packed:
            counts = plots.level_counts(model)
            if counts:
                written.append(_write_atomic(plot_dir / WEIGHTS_PLOT, lambda p: plots.plot_levels(counts, p)))
                drawn["weights_caption"] = _weights_caption_packed(counts)
        else:
            histogram = plots.grid_distance_histogram(model)
            if histogram is not None:
                written.append(
                    _write_atomic(plot_dir / WEIGHTS_PLOT, lambda p: plots.plot_grid_distance(histogram, p))
                )
                drawn["weights_caption"] = _weights_caption_latent(histogram)
        if "weights_caption" in drawn:
            drawn[WEIGHTS_PLOT] = f"{PLOTS_DIR}/{WEIGHTS_PLOT}"
    plot_dir = directory / PLOTS_DIR
    for name in PLOT_FILES:
        if name not in drawn:
            with contextlib.suppress(FileNotFoundError):
                (plot_dir / name).unlink()
    with contextlib.suppress(OSError):
        plot_dir.rmdir()  # only if empty
    card = _render(model, facts, drawn)
    readme = directory / "README.md"
    written.append(_write_atomic(readme, lambda p: p.write_text(str(card), encoding="utf-8")))
    return written
