"""`LotionConfig`: the transformers quantization config for hf_lotion (quant_method "lotion")."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quant.spec import (
    CURVATURE_ESTIMATORS,
    DEFAULT_GRID_BY_BITS,
    GRIDS,
    METHODS,
    QuantSpec,
    invalid_value,
    resolve_learned_scales,
    validate_amplitudes,
    validate_bits,
    validate_choice,
    validate_group_size,
    validate_positive_float,
    validate_positive_int,
    validate_unit_interval,
)

QUANT_METHOD = "lotion"
# "latent": full-precision latent weights (+ learned scales), what training checkpoints hold.
# "packed": integers packed into int32 words plus scales, what `hf_lotion.convert` produces.
FORMATS = ("latent", "packed")


@dataclass(init=False, repr=False)
class LotionConfig(QuantizationConfigMixin):
    """Quantization-aware training config: pass it to `from_pretrained` to get a QAT model.

    Args:
        bits: integer bit width of the weights, one of 2, 3, 4, 8.
        group_size: input features sharing one scale; a positive divisor of every quantized layer's
            in_features, or -1 for one scale per output row.
        method: `"lotion"` (latent-weight training plus LOTION's rounding-noise regulariser),
            `"stableqat"` (fake-quant forward, Fourier-surrogate backward), `"ste"` (fake-quant forward,
            straight-through backward) or `"rtn"` (full-precision training, round-to-nearest at export).
        grid: absmax scale rule, `"full"` (`absmax / (2**(bits-1) - 1/2)`, all `2**bits` levels) or
            `"restricted"` (`absmax / (2**(bits-1) - 1)`). `None` picks by measurement: full at 2-4 bits,
            restricted at 8 bits.
        learned_scales: learn per-group scales with LSQ's gradient (fake-quant methods only). `None` means
            True for stableqat (as its reference code does) and False otherwise.
        lotion_lambda: strength of LOTION's regulariser (the paper's lambda), >= 0.
        curvature: LOTION's diagonal curvature estimate `G`: `"fisher"` (EMA of squared loss gradients,
            no extra pass) or `"gauss_newton"` (gradients of labels sampled from the model, one extra
            forward and backward every `curvature_every` steps). Either is scaled by the tokens per step.
            The Fisher is the default by measurement: better at 2 bits (1.950 vs 2.025 eval loss, 3
            seeds) and equal at 4 bits on the README's benchmark, at 1.25x instead of 1.30x fp step time.
        curvature_beta: EMA decay of the curvature estimate, in [0, 1).
        curvature_every: optimizer steps between Gauss-Newton estimates (ignored by `"fisher"`).
        stableqat_amplitudes: Fourier amplitudes of StableQAT's surrogate (`[]` or `[0.0]` is STE).
        modules_to_not_convert: module names (or prefixes, suffixes, regexes) kept in full precision.
            `None` keeps the output head (and tied weights) in full precision, as other transformers
            quantizers do; an explicit list replaces that default.
        format: what the model holds and its checkpoint stores: `"latent"` (full-precision latent weights,
            for training) or `"packed"` (packed integers and scales, set by `hf_lotion.convert`).

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> config = LotionConfig(bits=4, group_size=32, method="stableqat")
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/model", quantization_config=config)  # doctest: +SKIP
    """

    bits: int = 4
    group_size: int = 128
    method: str = "lotion"
    grid: str | None = None
    learned_scales: bool | None = None
    lotion_lambda: float = 1.0
    curvature: str = "fisher"
    curvature_beta: float = 0.99
    curvature_every: int = 10
    stableqat_amplitudes: list[float] | None = None
    modules_to_not_convert: list[str] | None = None
    format: str = "latent"
    quant_method: str = QUANT_METHOD

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        method: str = "lotion",
        grid: str | None = None,
        learned_scales: bool | None = None,
        lotion_lambda: float = 1.0,
        curvature: str = "fisher",
        curvature_beta: float = 0.99,
        curvature_every: int = 10,
        stableqat_amplitudes: list[float] | None = None,
        modules_to_not_convert: list[str] | None = None,
        format: str = "latent",
        **kwargs: Any,
    ) -> None:
        # `from_dict` passes the saved `quant_method` back in; anything else unknown is a user error.
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            invalid_value("LotionConfig", "quant_method", quant_method, f"{QUANT_METHOD!r}")
        if kwargs:
            allowed = sorted(f.name for f in fields(self))
            raise ValueError(f"LotionConfig got unknown keys {sorted(kwargs)}; allowed keys: {allowed}.")
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.method = method
        self.grid = grid
        self.learned_scales = learned_scales
        self.lotion_lambda = lotion_lambda
        self.curvature = curvature
        self.curvature_beta = curvature_beta
        self.curvature_every = curvature_every
        self.stableqat_amplitudes = [0.21] if stableqat_amplitudes is None else stableqat_amplitudes
        self.modules_to_not_convert = modules_to_not_convert
        self.format = format
        self.post_init()

    def post_init(self) -> None:
        """Validate every field (raising `ValueError` that names it) and resolve the `None` defaults."""
        validate_bits(self.bits)
        validate_group_size(self.group_size)
        validate_choice("method", self.method, METHODS)
        if self.grid is None:
            self.grid = DEFAULT_GRID_BY_BITS[self.bits]
        validate_choice("grid", self.grid, GRIDS)
        self.lotion_lambda = validate_positive_float("lotion_lambda", self.lotion_lambda)
        validate_choice("curvature", self.curvature, CURVATURE_ESTIMATORS)
        self.curvature_beta = validate_unit_interval("curvature_beta", self.curvature_beta)
        self.curvature_every = validate_positive_int("curvature_every", self.curvature_every)
        self.stableqat_amplitudes = list(validate_amplitudes(self.stableqat_amplitudes))
        if self.modules_to_not_convert is not None and (
            isinstance(self.modules_to_not_convert, str)
            or not all(isinstance(m, str) for m in self.modules_to_not_convert)
        ):
            invalid_value(
                "LotionConfig",
                "modules_to_not_convert",
                self.modules_to_not_convert,
                "None or a list of strings",
            )
        if self.modules_to_not_convert is not None:
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        validate_choice("format", self.format, FORMATS)
        self.learned_scales = resolve_learned_scales(self.method, self.learned_scales)

    def to_spec(self) -> QuantSpec:
        """The per-layer quantization spec this config describes (raises `ValueError` if inconsistent)."""
        return QuantSpec(
            bits=self.bits,
            group_size=self.group_size,
            method=self.method,
            grid=self.grid,
            learned_scales=self.learned_scales,
            stableqat_amplitudes=tuple(self.stableqat_amplitudes),
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
