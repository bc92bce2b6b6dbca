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


def unsupported_linear_like(
    model: nn.Module, modules_to_not_convert: Iterable[str] | None = None
) -> list[str]:
    """Layers that act as linears but are left in full precision (GPT-2 style `Conv1D`)."""
    excluded = list(modules_to_not_convert or ())
    return [
        name
        for name, module in model.named_modules()
        if type(module).__name__ == "Conv1D" and not matches_module(name, excluded)
    ]


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
    check_layers(layers, spec, check_values=check_values)
    conv1d = unsupported_linear_like(model, skipped)
    if conv1d:
        logger.warning(
            "hf_lotion quantizes nn.Linear layers only; these Conv1D layers stay in full precision: %s",
            ", ".join(conv1d),
        )
    if not layers:
        logger.warning("No nn.Linear layer to quantize was found (excluded: %s).", skipped)
    for name, module in layers:
        model.set_submodule(name, LotionLinear.from_linear(module, spec, method))
    return [name for name, _ in layers]


def lotion_layers(model: nn.Module) -> list[tuple[str, LotionLinear]]:
    """The `LotionLinear` layers of `model` with their names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LotionLinear)]


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
