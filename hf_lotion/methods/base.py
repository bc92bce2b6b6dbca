"""What a QAT method is: declared options, defaults, the train-mode weight, a backward surrogate and an
optional penalty on the weights. The layer asks its method; nothing else compares method names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import kernels
from ..quant.spec import DEFAULT_GRID_BY_BITS, QuantSpec, invalid_value
from ..quant.surrogates import Surrogate


@dataclass(frozen=True)
class Option:
    """One option a method declares: its name (a `LotionConfig` keyword), default and validator.

    `check(name, value, owner)` returns the normalised value or raises `ValueError` through
    `hf_lotion.quant.spec.invalid_value` (field, value, allowed). `None` always means the default.
    """

    name: str
    default: Any
    check: Callable[[str, Any, str], Any]
    help: str = ""


@dataclass(frozen=True)
class Penalty:
    """LOTION's rounding-noise penalty `(strength/2) sum G s^2 p (1 - p)`, added to the training loss.

    Inside backward, `gradient` adds `multiplier * coefficient * G * s (1 - 2p)` (zero on grid points, the
    scale detached) to a weight's gradient, where `multiplier` is the gradient that reached the loss and
    `coefficient` is `strength / 2` (times the curvature EMA's bias correction). `G` is the per-token
    empirical Fisher of the layer, an EMA with decay `curvature_beta`, refreshed every `curvature_every`
    optimizer steps (see `hf_lotion.nn.penalty`). Subclass and override `gradient` for another
    curvature-weighted penalty.
    """

    strength: float
    curvature_beta: float
    curvature_every: int

    def gradient(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        scales: torch.Tensor,
        curvature: torch.Tensor,
        spec: QuantSpec,
        coefficient: float,
        multiplier: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(grad + multiplier * coefficient * G * f'(w), coefficient * sum G f(w))`, `f = s^2 p (1 - p)`."""
        return kernels.add_lotion_penalty_grad(
            grad, weight, scales, curvature, spec.bits, spec.group_size, coefficient, multiplier
        )


class QatMethod:
    """Base class of a QAT method, registered by name with `register_method`.

    A subclass sets `name` (and optionally `aliases`, old spellings that still load), declares its
    `options`, and overrides what differs from full-precision training:

    * `surrogate()`: a `Surrogate` makes the train-mode forward fake-quantized with that backward; `None`
      (the default) trains the latent weight as is;
    * `penalty()`: a `Penalty` added to the training loss (LOTION's), or `None`;
    * `default_grid(bits)`, `learned_scales` (an option or a fixed class attribute);
    * `train_weight(weight, scales, spec)` (and `uses_scales()`) for anything else.

    Options become `LotionConfig` keywords, validated when the config is built; an instance holds the
    resolved values as attributes.

    Example:
        >>> from dataclasses import dataclass
        >>> from hf_lotion.quant.spec import validate_positive_float
        >>> @dataclass(frozen=True)
        ... class Clipped(Surrogate):
        ...     slope: float
        ...     def __call__(self, v):
        ...         return (1.0 - self.slope * (v - torch.round(v)).abs()).clamp_min(0.0)
        >>> @register_method
        ... class ClippedSTE(QatMethod):
        ...     name = "clipped_ste"
        ...     options = (Option("clip_slope", 1.0, validate_positive_float),)
        ...     def surrogate(self):
        ...         return Clipped(self.clip_slope)
        >>> LotionConfig(bits=4, method="clipped_ste", clip_slope=0.5).clip_slope  # doctest: +SKIP
        0.5
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[Option, ...]] = ()
    learned_scales: bool = False

    def __init__(self, owner: str = "LotionConfig", **values: Any) -> None:
        allowed = {option.name for option in self.options}
        unknown = sorted(set(values) - allowed)
        if unknown:
            invalid_value(
                owner,
                unknown[0],
                values[unknown[0]],
                f"options of method={self.name!r}: {sorted(allowed) or 'none'}",
            )
        for option in self.options:
            value = values.get(option.name)
            value = option.default if value is None else option.check(option.name, value, owner)
            setattr(self, option.name, value)
        self.validate(owner)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(option.name for option in cls.options)

    def option_values(self) -> dict[str, Any]:
        """The resolved options, as `LotionConfig` stores them (JSON-friendly)."""
        values = {}
        for option in self.options:
            value = getattr(self, option.name)
            values[option.name] = list(value) if isinstance(value, tuple) else value
        return values

    @functools.cached_property
    def backward_surrogate(self) -> Surrogate | None:
        """`surrogate()`, built once (options do not change after construction): layers read it per forward."""
        return self.surrogate()

    def validate(self, owner: str) -> None:
        """Cross-option checks; raise through `invalid_value`."""
        if self.learned_scales and self.backward_surrogate is None:
            invalid_value(
                owner,
                "learned_scales",
                self.learned_scales,
                f"False for method={self.name!r}: learned scales need a fake-quantized forward",
            )

    def default_grid(self, bits: int) -> str:
        """The scale rule used when `LotionConfig.grid` is None."""
        return DEFAULT_GRID_BY_BITS[bits]

    def surrogate(self) -> Surrogate | None:
        """The backward through rounding of a fake-quantized forward; `None` trains the latent weight."""
        return None

    def penalty(self) -> Penalty | None:
        """A penalty added to the training loss, or `None`."""
        return None

    def uses_scales(self) -> bool:
        """Whether `train_weight` reads the scales (else the layer passes None and skips computing them)."""
        return self.backward_surrogate is not None

    def train_weight(
        self, weight: torch.Tensor, scales: torch.Tensor | None, spec: QuantSpec
    ) -> torch.Tensor:
        """The weight the train-mode forward multiplies by (differentiable in `weight` and learned `scales`)."""
        surrogate = self.backward_surrogate
        if surrogate is None:
            return weight
        return kernels.fake_quantize(weight, scales, spec.bits, spec.group_size, surrogate, spec.scale_dtype)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.option_values() == self.option_values()

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.option_values().items())
        return f"{self.name}({options})"


_REGISTRY: dict[str, type[QatMethod]] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type[QatMethod] | None = None, *, replace: bool = False):
    """Register a `QatMethod` subclass under its `name` (and `aliases`); usable as a class decorator.

    Registering a taken name raises unless `replace=True`.
    """

    def register(method: type[QatMethod]) -> type[QatMethod]:
        if not (isinstance(method, type) and issubclass(method, QatMethod)) or not method.name:
            raise ValueError(f"register_method needs a QatMethod subclass with a `name`, got {method!r}.")
        for key in (method.name, *method.aliases):
            taken = _REGISTRY.get(_ALIASES.get(key, key))
            if taken is not None and taken is not method and not replace:
                raise ValueError(
                    f"A QAT method is already registered as {key!r} ({taken.__qualname__}); pass replace=True "
                    "to override it, or choose another name."
                )
        replaced = _REGISTRY.get(method.name)
        for alias in replaced.aliases if replaced is not None else ():
            _ALIASES.pop(alias, None)
        _ALIASES.pop(method.name, None)  # a name is no longer an old spelling of another method
        _REGISTRY[method.name] = method
        for alias in method.aliases:
            _ALIASES[alias] = method.name
        return method

    return register if cls is None else register(cls)


def unregister_method(name: str) -> None:
    """Remove a registered method (and its aliases)."""
    method = _REGISTRY.pop(canonical_method_name(name))
    for alias in method.aliases:
        _ALIASES.pop(alias, None)


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def registered_methods() -> dict[str, type[QatMethod]]:
    """The registered method classes by name (a copy)."""
    return dict(_REGISTRY)


def canonical_method_name(name: object, owner: str = "LotionConfig") -> str:
    """`name`, or the current name of an old spelling; raises for unregistered names."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in _REGISTRY:
        invalid_value(
            owner,
            "method",
            name,
            f"one of {method_names()} (register another with hf_lotion.register_method)",
        )
    return key  # type: ignore[return-value]


def method_class(name: str, owner: str = "LotionConfig") -> type[QatMethod]:
    """The registered class for `name` (or an alias)."""
    return _REGISTRY[canonical_method_name(name, owner)]


def build_method(name: str | QatMethod, owner: str = "LotionConfig", **options: Any) -> QatMethod:
    """An instance of the method `name` with validated `options` (an instance is returned as is)."""
    if isinstance(name, QatMethod):
        if options:
            raise ValueError("build_method takes options only with a method name.")
        return name
    return method_class(name, owner)(owner=owner, **options)
