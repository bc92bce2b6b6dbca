"""`LotionConfig`: the transformers quantization config for hf_lotion (quant_method "lotion")."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import FORMAT_VERSION
from .methods import (
    QatMethod,
    canonical_method_name,
    method_class,
    method_names,
    registered_methods,
)
from .quant.spec import (
    DEFAULT_GROUP_SIZES,
    GRIDS,
    QuantSpec,
    default_group_size,
    invalid_value,
    validate_bits,
    validate_choice,
    validate_group_size,
    validate_scale_dtype,
)

logger = logging.getLogger(__name__)

QUANT_METHOD = "lotion"
# "latent": full-precision latent weights (+ learned scales), what training checkpoints hold.
# "packed": integers packed into int32 words plus scales, what `hf_lotion.convert` produces.
FORMATS = ("latent", "packed")
# What fixes the grid a checkpoint is quantized on: these cannot change once a model is trained.
STORAGE_FIELDS = ("bits", "group_size", "grid", "scale_dtype")
DEFAULT_BITS = 4
# Fields of every config; a method's options come on top (see `hf_lotion.methods`).
COMMON_FIELDS = ("quant_method", "bits", "group_size", "grid", "method", "modules_to_not_convert", "format")
# Fields written to config.json only when set (so that configs without them stay as before).
OPTIONAL_FIELDS = ("scale_dtype",)


class LotionConfig(QuantizationConfigMixin):
    """Quantization-aware training config: pass it to `from_pretrained` to get a QAT model.

    Storage fields (fixed once a model is trained): `bits`, `group_size`, `grid`. Training fields: `method`
    and the method's options, which may change when a latent checkpoint is reloaded.

    Args:
        bits: integer bit width of the weights, one of 2, 3, 4, 8 (`None`: 4).
        group_size: input features sharing one scale; a positive divisor of every quantized layer's
            in_features, or -1 for one scale per output row. `None` resolves per model when the config is
            applied: 128 where it divides every quantized layer's in_features, else the largest of 64/32/16
            that does, else -1; the choice is logged and saved explicitly in the model's config.
        method: a registered QAT method (`hf_lotion.methods`): `"lotion"` (latent-weight training plus
            LOTION's rounding-noise penalty in the loss), `"stableqat"` (fake-quant forward, Fourier-surrogate
            backward), `"ste"` (fake-quant forward, straight-through backward) or `"full_precision"` (train
            in full precision, round to nearest at export; `"rtn"` is its old name).
        grid: absmax scale rule, `"full"` (`absmax / (2**(bits-1) - 1/2)`, all `2**bits` levels) or
            `"restricted"` (`absmax / (2**(bits-1) - 1)`). `None` takes the method's default: full at 2-4 bits,
            restricted at 8 bits, by measurement.
        modules_to_not_convert: module names (or prefixes, suffixes, regexes) kept in full precision.
            `None` keeps the output head (and tied weights) in full precision, as other transformers
            quantizers do; an explicit list replaces that default.
        format: what the model holds and its checkpoint stores: `"latent"` (full-precision latent weights,
            for training) or `"packed"` (packed integers and scales, set by `hf_lotion.convert`).
        scale_dtype: `None` (default: scales in the compute dtype, as before) or `"float16"`, `"bfloat16"`,
            `"float32"`: every scale the forward uses (absmax, learned, LOTION's noise scale; in training and
            in eval, so also `convert`) is rounded to a value representable in that dtype,
            `s.to(scale_dtype).to(compute dtype)`. `"float16"` trains exactly what formats with fp16 scales
            store: `hf_lotion.export_gguf` writes such a model to GGUF Q4_0/Q8_0 without re-rounding. With
            bf16 compute, fp16 scales are rounded to fp16 then to bf16 (values representable in both).
            Fixed once a model is trained, like `grid`.
        **method_options: the method's options, validated against it. `lotion`: `lotion_lambda` (1.0),
            `curvature` ("fisher", the per-token empirical Fisher), `curvature_beta` (0.99),
            `curvature_every` (4). `stableqat`: `stableqat_amplitudes` ([0.21]), `learned_scales` (True).
            `ste`: `learned_scales` (False).

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> config = LotionConfig(bits=4, group_size=32, method="stableqat")
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/model", quantization_config=config)  # doctest: +SKIP
    """

    def __init__(
        self,
        bits: int | None = None,
        group_size: int | None = None,
        method: str = "lotion",
        grid: str | None = None,
        modules_to_not_convert: list[str] | None = None,
        format: str = "latent",
        scale_dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        # `from_dict` passes the saved `quant_method` back in; anything else must be an option of the method.
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            invalid_value("LotionConfig", "quant_method", quant_method, f"{QUANT_METHOD!r}")
        self.quant_method = QUANT_METHOD
        # Storage fields the caller chose; at reload the others come from the checkpoint.
        self._given = frozenset(
            name
            for name, value in (
                ("bits", bits),
                ("group_size", group_size),
                ("grid", grid),
                ("scale_dtype", scale_dtype),
            )
            if value is not None
        )
        self.bits = DEFAULT_BITS if bits is None else bits
        self.group_size = group_size
        self.method = canonical_method_name(method)
        self.grid = grid
        self.modules_to_not_convert = modules_to_not_convert
        self.format = format
        self.scale_dtype = scale_dtype
        options = method_class(self.method).option_names()
        _refuse_unknown_keys(self.method, kwargs, options)
        for name in options:
            setattr(self, name, kwargs.get(name))
        self.post_init()

    def post_init(self) -> None:
        """Validate every field (raising `ValueError` that names it) and resolve the `None` defaults."""
        validate_bits(self.bits)
        if self.group_size is not None:
            validate_group_size(self.group_size)
        self.method = canonical_method_name(self.method)
        method = self.build_method()
        for name, value in method.option_values().items():
            setattr(self, name, value)
        if self.grid is None:
            self.grid = method.default_grid(self.bits)
        validate_choice("grid", self.grid, GRIDS)
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
        validate_scale_dtype(getattr(self, "scale_dtype", None))

    # -- what the config describes -------------------------------------------------------------------------

    def to_spec(self) -> QuantSpec:
        """The storage spec (bits, group size, grid) of every quantized layer."""
        if self.group_size is None:
            raise ValueError(
                "LotionConfig.group_size=None is resolved per model when the config is applied "
                "(from_pretrained or hf_lotion.prepare); call resolve_group_size(in_features) first, or set it."
            )
        return QuantSpec(
            bits=self.bits, group_size=self.group_size, grid=self.grid, scale_dtype=self.scale_dtype
        )

    def resolve_group_size(self, in_features: Iterable[int], where: str = "the model") -> int:
        """Fix `group_size=None` for layers of these widths (`default_group_size`), logging the choice.

        An explicit group size is kept as it is (a width it does not divide still raises when applied).
        """
        if self.group_size is None:
            widths = sorted(set(in_features))
            self.group_size = default_group_size(widths)
            if self.group_size == DEFAULT_GROUP_SIZES[0]:
                logger.info("LotionConfig.group_size=None resolved to %d for %s.", self.group_size, where)
            else:
                kind = "one scale per row" if self.group_size == -1 else f"{self.group_size}"
                logger.warning(
                    "LotionConfig.group_size=None resolved to %s for %s: %d does not divide every quantized "
                    "layer's in_features (%s). The choice is saved in the config; set group_size to override.",
                    kind,
                    where,
                    DEFAULT_GROUP_SIZES[0],
                    ", ".join(str(w) for w in widths[:8]) + (", ..." if len(widths) > 8 else ""),
                )
        return self.group_size

    def build_method(self) -> QatMethod:
        """The QAT method with this config's options (validated)."""
        cls = method_class(self.method)
        return cls(**{name: getattr(self, name, None) for name in cls.option_names()})

    def method_options(self) -> dict[str, Any]:
        """The method's options as stored in config.json."""
        return {name: getattr(self, name) for name in method_class(self.method).option_names()}

    def packed(self) -> LotionConfig:
        """A copy describing the converted (packed) model: storage fields and the method's name."""
        return LotionConfig(
            bits=self.bits,
            group_size=self.group_size,
            method=self.method,
            grid=self.grid,
            modules_to_not_convert=copy.copy(self.modules_to_not_convert),
            format="packed",
            scale_dtype=self.scale_dtype,
        )

    def merged_for_reload(self, requested: LotionConfig) -> LotionConfig:
        """This (saved) config with the training fields of `requested`, passed to `from_pretrained`.

        Storage fields that `requested` sets must agree (a `ValueError` names both values); those it leaves
        at their defaults come from the checkpoint. `requested` is not modified.
        """
        for name in STORAGE_FIELDS:
            asked, saved = getattr(requested, name), getattr(self, name)
            if name in requested._given and asked != saved:
                raise ValueError(
                    f"LotionConfig.{name}={asked!r} does not match the checkpoint's {name}={saved!r}; allowed: "
                    f"{saved!r}. bits, group_size and grid fix the grid the checkpoint was quantized on, so they "
                    "cannot change at reload (method and its options can)."
                )
        modules = requested.modules_to_not_convert
        if self.format == "packed":
            if modules is not None and modules != self.modules_to_not_convert:
                raise ValueError(
                    f"LotionConfig.modules_to_not_convert={modules!r} does not match the packed checkpoint's "
                    f"{self.modules_to_not_convert!r}; allowed: the checkpoint's value (its layers are packed)."
                )
            return copy.deepcopy(self)
        return LotionConfig(
            bits=self.bits,
            group_size=self.group_size,
            method=requested.method,
            grid=self.grid,
            modules_to_not_convert=copy.copy(modules if modules is not None else self.modules_to_not_convert),
            format=self.format,
            scale_dtype=self.scale_dtype,
            **copy.deepcopy(requested.method_options()),
        )

    # -- serialization ---------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a saved config (config.json's `quantization_config`), written by any hf-lotion.

        Earlier versions' configs are upgraded (options of every method, `"rtn"`). Later versions' configs
        load as long as this version reads what their tensors mean:

        * Storage fields decide what the checkpoint's tensors mean: `bits`, `group_size`, `grid` (levels and
          scale rule), `format` (latent weights or packed integers, and their layout) and
          `modules_to_not_convert` (which layers hold quantized tensors). They are validated as in
          `__init__`, never ignored: a `format` this version does not know, or a `format_version` above
          `hf_lotion.checkpoint.FORMAT_VERSION`, raises `ValueError` asking to upgrade hf-lotion. A release
          that adds a storage field (another scale kind, zero points, ...) must bump the format version, in
          config.json's `format_version` (not written today: absent means 1) and in the safetensors metadata
          (`hf_lotion_format_version`, checked for every file at load), so this one refuses it.
        * Any other key this version does not know can only be a training option (of a newer release, or
          of a method this version does not have): it is ignored with one warning that names it.

        Only saved configs are read leniently: `LotionConfig(...)` in code still refuses unknown keys.
        """
        data = _drop_unknown_saved_keys(_upgrade_saved(dict(config_dict)))
        return super().from_dict(data, return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        data = {name: copy.deepcopy(getattr(self, name)) for name in COMMON_FIELDS}
        data.update({name: getattr(self, name) for name in OPTIONAL_FIELDS if getattr(self, name, None)})
        if self.format == "latent":
            data.update(copy.deepcopy(self.method_options()))
        return data

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LotionConfig) and other.to_dict() == self.to_dict()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _refuse_unknown_keys(method: str, kwargs: dict[str, Any], options: tuple[str, ...]) -> None:
    unknown = sorted(set(kwargs) - set(options))
    if not unknown:
        return
    owners = {name: cls.name for cls in registered_methods().values() for name in cls.option_names()}
    for key in unknown:
        if key in owners:
            invalid_value(
                "LotionConfig",
                key,
                kwargs[key],
                f"an option of method={owners[key]!r}, not of method={method!r}, whose options are "
                f"{list(options) or 'none'}",
            )
    allowed = sorted({*COMMON_FIELDS, *OPTIONAL_FIELDS, *options})
    raise ValueError(
        f"LotionConfig got unknown keys {unknown}; allowed keys for method={method!r}: {allowed} "
        f"(methods: {list(method_names())})."
    )


def _drop_unknown_saved_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Refuse a saved config of a newer storage format; drop (and name, in a warning) keys not known here."""
    upgrade = "It was written by a newer hf-lotion: upgrade hf-lotion (pip install -U hf-lotion)."
    version = data.pop("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"LotionConfig.format_version={version!r} is not supported; allowed: an integer from 1 to "
            f"{FORMAT_VERSION}. {upgrade}"
        )
    if data.get("format", "latent") not in FORMATS:
        raise ValueError(
            f"LotionConfig.format={data['format']!r} is not supported; allowed: one of {FORMATS}. {upgrade}"
        )
    method = data.get("method", "lotion")
    if isinstance(method, str) and method not in method_names():
        # The method decides how a latent checkpoint's tensors are used (learned scales): never guessed.
        raise ValueError(
            f"LotionConfig.method={method!r} (saved in the checkpoint) is not supported; allowed: one of "
            f"{tuple(method_names())}. The checkpoint may come from a newer hf-lotion: upgrade hf-lotion "
            "(pip install -U hf-lotion), or register the method with hf_lotion.register_method."
        )
    if not isinstance(method, str):
        return data  # the constructor reports the bad value
    unknown = sorted(set(data) - {*COMMON_FIELDS, *OPTIONAL_FIELDS, *method_class(method).option_names()})
    if unknown:
        logger.warning(
            "Ignoring keys %s of a saved LotionConfig (method=%r): this hf-lotion does not know them. They are "
            "training options of a newer release or of another method, which do not change the stored tensors.",
            unknown,
            method,
        )
    return {key: value for key, value in data.items() if key not in unknown}


def _upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """Saved configs up to 0.1 stored every method's options and called `full_precision` "rtn"."""
    method = data.get("method", "lotion")
    if method not in method_names() and isinstance(method, str):
        try:
            method = canonical_method_name(method)
        except ValueError:
            return data  # the constructor reports the unknown method
        data["method"] = method
    if method not in method_names():
        return data
    own = set(method_class(method).option_names())
    foreign = {name for cls in registered_methods().values() for name in cls.option_names()} - own
    if foreign & set(data) and method == "lotion" and data.get("curvature") == "fisher":
        # Up to 0.1, `curvature_every` applied to the Gauss-Newton estimate only; the Fisher was every step.
        data.pop("curvature_every", None)
    for key in foreign & set(data):
        data.pop(key)
    if data.get("curvature") == "gauss_newton":
        logger.warning(
            "This checkpoint was trained with curvature='gauss_newton', which hf-lotion no longer offers; "
            "LOTION continues with the per-token empirical Fisher (curvature='fisher')."
        )
        data["curvature"] = "fisher"
    return data
