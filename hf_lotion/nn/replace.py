"""Find the linear layers of a model that get quantized, validate them, and swap in `LotionLinear`."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..methods import QatMethod
from ..quant.spec import QuantSpec, check_divisible
from .qat_linear import LotionLinear

logger = logging.getLogger(__name__)


def matches_module(name: str, patterns: Iterable[str] | None) -> bool:
    """Whether `name` is covered by one of `patterns`, as transformers' quantizers match them.

    A pattern matches from the start up to a module boundary (`"model.layers.1"` covers
    `"model.layers.1.mlp.up_proj"`, not `"model.layers.11..."`), as a regex with the same boundary
    (`"model.layers.*.mlp"`), or as a dotted suffix (`"lm_head"`, `"down_proj"`).
    """
    for pattern in patterns or ():
        if name == pattern or name.endswith("." + pattern):
            return True
        try:
            if re.match(rf"(?:{pattern})(?:\.|$)", name):
                return True
        except re.error:
            if name.startswith(pattern + "."):
                return True
    return False


def quantizable_linears(
    model: nn.Module, modules_to_not_convert: Iterable[str] | None = None
) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` layers (exact type) of `model` that are not excluded, in module order."""
    excluded = list(modules_to_not_convert or ())
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not matches_module(name, excluded)
    ]


# Appended to the repr of modules whose weights the quantizer leaves in full precision.
FULL_PRECISION_NOTE = "full precision: not quantized by hf_lotion"


def unconverted_weights(
    model: nn.Module, modules_to_not_convert: Iterable[str] | None = None
) -> list[tuple[str, nn.Module, str, int]]:
    """Linear-like weights the quantizer cannot convert and that were not excluded on purpose.

    `(parameter name, owning module, kind, numel)` for GPT-2 style `Conv1D` weights, `nn.Linear` subclasses
    (only the exact type is converted) and weights of 3 or more dimensions of modules that are not torch's
    own (transformers' fused MoE experts; convolutions are not linear-like).
    """
    excluded = list(modules_to_not_convert or ())
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, LotionLinear) or matches_module(module_name, excluded):
            continue
        linear_like = type(module).__name__ == "Conv1D" or (
            isinstance(module, nn.Linear) and type(module) is not nn.Linear
        )
        for param_name, param in module.named_parameters(recurse=False):
            if linear_like and param_name == "weight":
                kind = f"{type(module).__name__} layer"
            elif param.dim() >= 3 and not type(module).__module__.startswith("torch."):
                # A model's own 3-D weights (fused MoE experts); torch's convolutions are not linear-like.
                kind = f"{param.dim()}-D weight"
            else:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            found.append((name, module, f"{kind} {tuple(param.shape)}", param.numel()))
    return found


def full_precision_summary(model: nn.Module, found: list[tuple[str, nn.Module, str, int]]) -> str:
    """One line on the linear-like weights `found` by `unconverted_weights` ("" when there are none)."""
    if not found:
        return ""
    count = sum(numel for *_, numel in found)
    # Tied copies count once, also before from_pretrained has tied them.
    tied_copies = set(getattr(model, "all_tied_weights_keys", None) or ())
    total = sum(p.numel() for name, p in model.named_parameters() if name not in tied_copies)
    shown = ", ".join(f"{name} ({kind})" for name, _, kind, _ in found[:6])
    more = f", and {len(found) - 6} more" if len(found) > 6 else ""
    return (
        f"hf_lotion quantizes nn.Linear layers only; {len(found)} linear-like weight(s) with {count:,} "
        f"parameters ({100 * count / max(total, 1):.1f}% of the model's) stay in full precision: {shown}{more}."
    )


def mark_full_precision(model: nn.Module, found: list[tuple[str, nn.Module, str, int]]) -> None:
    """Say in `print(model)` which linear-like weights (from `unconverted_weights`) stay in full precision.

    The note goes into the owning module's `extra_repr` (an instance attribute: the class is untouched), or,
    for a module whose class writes its own `__repr__` (GPT-2's `Conv1D`), into its parent's, naming it.
    """
    notes: dict[str, list[str]] = {}
    for param_name, module, _, _ in found:
        module_name = param_name.rpartition(".")[0]
        if type(module).__repr__ is nn.Module.__repr__:
            notes.setdefault(module_name, [])
        else:
            parent, _, child = module_name.rpartition(".")
            notes.setdefault(parent, []).append(child)
    for module_name, children in notes.items():
        module = model.get_submodule(module_name)
        note = FULL_PRECISION_NOTE + (f": {', '.join(dict.fromkeys(children))}" if children else "")
        module.extra_repr = _NotedExtraRepr(module, note)


class _NotedExtraRepr:
    """The module class's `extra_repr` plus a note; a plain object, so the model still pickles and copies."""

    def __init__(self, module: nn.Module, note: str) -> None:
        self.module, self.note = module, note

    def __call__(self) -> str:
        return ", ".join(filter(None, (type(self.module).extra_repr(self.module), self.note)))


def check_layers(layers: list[tuple[str, nn.Linear]], spec: QuantSpec, check_values: bool = True) -> None:
    """Raise `ValueError` for the first layer the spec cannot quantize; nothing is modified.

    Checks that `group_size` divides every layer's in_features and, when `check_values` and the weights are
    materialised, that every weight is finite.
    """
    for name, module in layers:
        check_divisible(spec.group_size, module.in_features, name)
    if not check_values:
        return
    for name, module in layers:
        weight = module.weight
        if not weight.is_meta and not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(
                f"Layer '{name}' has {bad} non-finite weight value(s) (NaN or inf); allowed: finite weights only. "
                "Quantization scales would be undefined. Fix the checkpoint or list the layer in "
                "modules_to_not_convert."
            )


def shared_weights(model: nn.Module) -> dict[str, str]:
    """`{parameter name: the name it is tied to}` for the model's tied parameters, both ways.

    Parameters that are one object under two names; and, while the weights are not loaded yet (meta
    tensors, inside `from_pretrained`), transformers' tie map (`all_tied_weights_keys`) of what it will tie.
    A materialised model is judged by identity only: a head the user untied is not tied.
    """
    tied: dict[str, str] = {}
    if any(param.is_meta for param in model.parameters()):
        for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            tied[target], tied[source] = source, target
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied.setdefault(name, first_name[id(param)])
            tied.setdefault(first_name[id(param)], name)
        else:
            first_name[id(param)] = name
    return tied


def check_not_tied(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Raise `ValueError` if a layer to quantize shares its weight with another module (tied embeddings).

    A packed layer stores integers where the other module needs the float weight, so the checkpoint would
    not load; refusing before anything changes is the only safe answer.
    """
    tied = shared_weights(model)
    for name, _ in layers:
        other = tied.get(f"{name}.weight")
        if other is not None:
            raise ValueError(
                f"Layer '{name}' shares its weight with '{other}' (tied weights, e.g. tie_word_embeddings=True), "
                "so it cannot be quantized on its own; allowed: list it in modules_to_not_convert (the default "
                "None keeps the output head in full precision), or untie the weights first (load the model "
                "with tie_word_embeddings=False)."
            )


def replace_linear_layers(
    model: nn.Module,
    spec: QuantSpec,
    method: QatMethod | str = "lotion",
    modules_to_not_convert: Iterable[str] | None = None,
    check_values: bool = True,
) -> list[str]:
    """Swap every eligible `nn.Linear` of `model` for a `LotionLinear` sharing its parameters.

    Validation runs first, so a bad layer raises before any module is swapped. Returns the swapped names.

    Example:
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> replace_linear_layers(model, QuantSpec(bits=4, group_size=16), "ste", modules_to_not_convert=["2"])
        ['0']
    """
    if is_lotion_model(model):
        raise ValueError("The model already has LotionLinear layers; quantize a model only once.")
    skipped = list(modules_to_not_convert or ())
    layers = quantizable_linears(model, skipped)
    check_not_tied(model, layers)
    check_layers(layers, spec, check_values=check_values)
    if not layers:
        logger.warning("No nn.Linear layer to quantize was found (excluded: %s).", skipped)
    for name, module in layers:
        model.set_submodule(name, LotionLinear.from_linear(module, spec, method))
    found = unconverted_weights(model, skipped)
    if found:
        logger.warning(full_precision_summary(model, found))
        mark_full_precision(model, found)
    return [name for name, _ in layers]


def lotion_layers(model: nn.Module) -> list[tuple[str, LotionLinear]]:
    """The `LotionLinear` layers of `model` with their names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LotionLinear)]


def adapter_wrapped_layers(model: nn.Module, kinds: tuple[type[nn.Module], ...] | None = None) -> list[str]:
    """Names of the quantized layers (of `kinds`; default `LotionLinear` and `PackedLinear`) that carry PEFT
    adapters.

    An adapter layer holds the layer it wraps as `base_layer`; packing or exporting under it would drop the
    adapters, so callers refuse these models and ask for `merge_and_unload()` first.
    """
    from .packed_linear import PackedLinear

    kinds = kinds or (LotionLinear, PackedLinear)
    return [
        name.removesuffix(".base_layer")
        for name, module in model.named_modules()
        if name.endswith(".base_layer") and isinstance(module, kinds)
    ]


def is_lotion_model(model: nn.Module) -> bool:
    """Whether `model` has at least one `LotionLinear` layer."""
    return any(isinstance(m, LotionLinear) for m in model.modules())


@contextmanager
def latent_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, eval-mode `LotionLinear` layers use the unquantized latent weight.

    Eval mode normally runs the deployed RTN weight; this shows the loss of the latent model beside it.

    Example:
        >>> with latent_weights(model):  # doctest: +SKIP
        ...     latent_loss = model(**batch).loss
    """
    layers = [layer for _, layer in lotion_layers(model)]
    previous = [layer.eval_latent for layer in layers]
    for layer in layers:
        layer.eval_latent = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer.eval_latent = flag
