"""What a quantized weight is: bit width, grouping and scale rule; and the shared field validators.

Pure Python, no torch: the transformers config, the QAT methods and the `nn` modules all build on this,
and every validation error is raised through `invalid_value` so that all report the same message
(field, value, allowed values).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SUPPORTED_BITS = (2, 3, 4, 8)
GRIDS = ("full", "restricted")
# Dtypes that scales can be rounded to in the forward (`QuantSpec.scale_dtype`); None: the compute dtype.
# "float16" makes the trained model exactly what formats with fp16 scales store (GGUF Q4_0 / Q8_0).
SCALE_DTYPES = ("float16", "bfloat16", "float32")

# Measured RTN reconstruction error (relative MSE, Gaussian and Student-t weights, groups 32 and 128):
# the full-range rule is 0.51-0.73x the restricted one at 2 bits, 0.75-0.83x at 3 bits, 0.89-0.96x at
# 4 bits, and 1.02-1.09x (worse) at 8 bits, where clipping the largest element costs more than the
# finer step saves. The README's "Choosing a grid" section records the command.
DEFAULT_GRID_BY_BITS = {2: "full", 3: "full", 4: "full", 8: "restricted"}

# StableQAT's surrogate g = (1 - c S) / (1 + c S), c = sqrt(2) pi, stays positive and bounded only
# while c * sum|a_k| < 1.
SURROGATE_COEFF = math.sqrt(2.0) * math.pi
MAX_AMPLITUDE_SUM = 1.0 / SURROGATE_COEFF


def invalid_value(owner: str, name: str, value: object, allowed: str) -> None:
    """Raise the project's standard error for a bad field: who, which field, the value, what is allowed."""
    raise ValueError(f"{owner}.{name}={value!r} is not supported; allowed: {allowed}.")


def validate_bits(bits: object, owner: str = "LotionConfig") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        invalid_value(owner, "bits", bits, f"one of {SUPPORTED_BITS}")
    return bits  # type: ignore[return-value]


def validate_group_size(group_size: object, owner: str = "LotionConfig") -> int:
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or (group_size <= 0 and group_size != -1)
    ):
        invalid_value(
            owner,
            "group_size",
            group_size,
            "a positive integer that divides in_features, or -1 (one scale per row)",
        )
    return group_size  # type: ignore[return-value]


def validate_choice(name: str, value: object, choices: Sequence[str], owner: str = "LotionConfig") -> str:
    if value not in choices:
        invalid_value(owner, name, value, f"one of {tuple(choices)}")
    return value  # type: ignore[return-value]


def validate_scale_dtype(value: object, owner: str = "LotionConfig") -> str | None:
    """`None` (scales in the compute dtype) or one of `SCALE_DTYPES`."""
    if value is not None and value not in SCALE_DTYPES:
        invalid_value(owner, "scale_dtype", value, f"None (the compute dtype) or one of {SCALE_DTYPES}")
    return value  # type: ignore[return-value]


def validate_unit_interval(name: str, value: object, owner: str = "LotionConfig") -> float:
    """A float in [0, 1) (EMA decay rates)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        invalid_value(owner, name, value, "a number in [0, 1)")
    return float(value)  # type: ignore[arg-type]


def validate_positive_int(name: str, value: object, owner: str = "LotionConfig") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        invalid_value(owner, name, value, "an integer >= 1")
    return value  # type: ignore[return-value]


def validate_bool(name: str, value: object, owner: str = "LotionConfig") -> bool:
    if not isinstance(value, bool):
        invalid_value(owner, name, value, "True or False")
    return value  # type: ignore[return-value]


def validate_amplitudes(amplitudes: object, owner: str = "LotionConfig") -> tuple[float, ...]:
    name = "stableqat_amplitudes"
    if (
        isinstance(amplitudes, (int, float))
        or not isinstance(amplitudes, Sequence)
        or isinstance(amplitudes, str)
    ):
        invalid_value(
            owner, name, amplitudes, "a list of finite floats (Fourier amplitudes, [] or [0.0] is STE)"
        )
    values = []
    for a in amplitudes:  # type: ignore[union-attr]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            invalid_value(
                owner, name, amplitudes, "a list of finite floats (Fourier amplitudes, [] or [0.0] is STE)"
            )
        values.append(float(a))
    if sum(abs(a) for a in values) >= MAX_AMPLITUDE_SUM:
        invalid_value(
            owner,
            name,
            amplitudes,
            f"amplitudes with sum(|a_k|) < 1/(sqrt(2)*pi) = {MAX_AMPLITUDE_SUM:.4f}, so the surrogate gradient "
            "stays positive and bounded",
        )
    return tuple(values)


def validate_positive_float(
    name: str, value: object, owner: str = "LotionConfig", allow_zero: bool = True
) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)  # type: ignore[operator]
    if not ok:
        invalid_value(owner, name, value, "a finite number >= 0" if allow_zero else "a finite number > 0")
    return float(value)  # type: ignore[arg-type]


def resolve_group_size(group_size: int, in_features: int) -> int:
    """The number of input features that share one scale (`-1` means the whole row)."""
    return in_features if group_size == -1 else group_size


# What `group_size=None` resolves to: the first of these that divides every quantized layer's in_features.
DEFAULT_GROUP_SIZES = (128, 64, 32, 16)


def default_group_size(in_features: Iterable[int]) -> int:
    """The default group size for layers of these widths: 128, else the largest of 64/32/16 dividing all,
    else -1 (one scale per row, which fits any width).

    Example:
        >>> default_group_size([576, 1536])  # SmolLM2-135M: 128 does not divide 576
        64
    """
    widths = list(in_features)
    for size in DEFAULT_GROUP_SIZES:
        if all(width % size == 0 for width in widths):
            return size
    return -1


def check_divisible(group_size: int, in_features: int, layer: str) -> None:
    """Raise if `group_size` does not split `in_features` of `layer` into whole groups."""
    if group_size != -1 and in_features % group_size != 0:
        raise ValueError(
            f"LotionConfig.group_size={group_size} does not divide in_features={in_features} of layer "
            f"'{layer}'; allowed: a positive divisor of every quantized layer's in_features, or -1 (one scale "
            "per row). Alternatively list the layer in modules_to_not_convert."
        )


@dataclass(frozen=True)
class QuantSpec:
    """How one linear layer's weight is stored: bit width, grouping and scale rule.

    These are the *storage* fields: they fix the grid a checkpoint is quantized on, so they cannot change
    once a model is trained. How the weight is trained (the QAT method and its options) lives in
    `hf_lotion.methods`. `scale_dtype` (None, "float16", "bfloat16", "float32") rounds every scale the
    forward uses to values representable in that dtype (`s.to(scale_dtype).to(compute dtype)`); None keeps
    the compute dtype's scales.

    Example:
        >>> QuantSpec(bits=4, group_size=32).grid
        'full'
        >>> QuantSpec(bits=4, group_size=32, scale_dtype="float16").scale_dtype
        'float16'
    """

    bits: int = 4
    group_size: int = 128
    grid: str | None = None
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        owner = "QuantSpec"
        validate_bits(self.bits, owner)
        validate_group_size(self.group_size, owner)
        if self.grid is None:
            object.__setattr__(self, "grid", DEFAULT_GRID_BY_BITS[self.bits])
        validate_choice("grid", self.grid, GRIDS, owner)
        validate_scale_dtype(self.scale_dtype, owner)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1
