"""LotionConfig: defaults, serialization, and the errors for bad input (field, value, allowed values)."""

from __future__ import annotations

import json

import pytest

from hf_lotion import LotionConfig, QuantSpec


def test_defaults_resolved_by_bits_and_method():
    assert LotionConfig().grid == "full" and LotionConfig(bits=8).grid == "restricted"
    assert LotionConfig(method="stableqat").learned_scales is True
    assert LotionConfig(method="ste").learned_scales is False
    assert LotionConfig().stableqat_amplitudes == [0.21] and LotionConfig().lotion_lambda == 1.0
    assert LotionConfig().modules_to_not_convert is None and LotionConfig().format == "latent"


def test_round_trip_through_dict_and_json():
    config = LotionConfig(
        bits=3,
        group_size=32,
        method="stableqat",
        stableqat_amplitudes=[0.1, 0.05],
        modules_to_not_convert=["lm_head", "model.layers.0"],
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["quant_method"] == "lotion"
    again = LotionConfig.from_dict(data)
    assert again == config and again.to_dict() == config.to_dict()
    assert "LotionConfig" in repr(config) and '"bits": 3' in str(config)


def test_to_spec():
    spec = LotionConfig(bits=2, group_size=-1, method="ste").to_spec()
    assert spec == QuantSpec(bits=2, group_size=-1, method="ste", grid="full", learned_scales=False)
    assert (spec.qmin, spec.qmax) == (-2, 1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bits": 5}, r"LotionConfig\.bits=5 is not supported; allowed: one of \(2, 3, 4, 8\)"),
        ({"bits": "4"}, r"LotionConfig\.bits='4'"),
        ({"bits": True}, r"LotionConfig\.bits=True"),
        (
            {"group_size": 0},
            r"LotionConfig\.group_size=0 is not supported; allowed: a positive integer .* or -1",
        ),
        ({"group_size": -2}, r"LotionConfig\.group_size=-2"),
        ({"group_size": 12.0}, r"LotionConfig\.group_size=12\.0"),
        (
            {"method": "gptq"},
            r"LotionConfig\.method='gptq' is not supported; allowed: one of \('lotion', 'stableqat', 'ste', 'rtn'\)",
        ),
        (
            {"grid": "asym"},
            r"LotionConfig\.grid='asym' is not supported; allowed: one of \('full', 'restricted'\)",
        ),
        ({"learned_scales": True}, r"LotionConfig\.learned_scales=True .* method='lotion'"),
        ({"method": "rtn", "learned_scales": True}, r"LotionConfig\.learned_scales=True .* method='rtn'"),
        ({"learned_scales": "yes"}, r"LotionConfig\.learned_scales='yes'"),
        (
            {"lotion_lambda": -1.0},
            r"LotionConfig\.lotion_lambda=-1\.0 is not supported; allowed: a finite number >= 0",
        ),
        ({"lotion_lambda": float("nan")}, r"LotionConfig\.lotion_lambda=nan"),
        (
            {"curvature": "adam"},
            r"LotionConfig\.curvature='adam' is not supported; allowed: one of \('fisher', 'gauss_newton'\)",
        ),
        (
            {"curvature_beta": 1.0},
            r"LotionConfig\.curvature_beta=1\.0 is not supported; allowed: a number in \[0, 1\)",
        ),
        ({"curvature_beta": -0.1}, r"LotionConfig\.curvature_beta=-0\.1"),
        (
            {"curvature_every": 0},
            r"LotionConfig\.curvature_every=0 is not supported; allowed: an integer >= 1",
        ),
        ({"curvature_every": 2.5}, r"LotionConfig\.curvature_every=2\.5"),
        (
            {"stableqat_amplitudes": [0.3]},
            r"LotionConfig\.stableqat_amplitudes=\[0\.3\] .* sum\(\|a_k\|\) < 1/\(sqrt\(2\)\*pi\)",
        ),
        ({"stableqat_amplitudes": 0.21}, r"LotionConfig\.stableqat_amplitudes=0\.21"),
        ({"stableqat_amplitudes": ["a"]}, r"LotionConfig\.stableqat_amplitudes=\['a'\]"),
        (
            {"modules_to_not_convert": "lm_head"},
            r"LotionConfig\.modules_to_not_convert='lm_head' .* a list of strings",
        ),
        (
            {"format": "gguf"},
            r"LotionConfig\.format='gguf' is not supported; allowed: one of \('latent', 'packed'\)",
        ),
        ({"quant_method": "awq"}, r"LotionConfig\.quant_method='awq' is not supported; allowed: 'lotion'"),
        ({"bitz": 4}, r"LotionConfig got unknown keys \['bitz'\]; allowed keys: \[.*'bits'.*\]"),
    ],
    ids=lambda x: x if isinstance(x, str) and len(x) < 1 else None,
)
def test_bad_values_raise_value_error_naming_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LotionConfig(**kwargs)


def test_unknown_key_in_saved_config_is_refused():
    data = LotionConfig().to_dict() | {"weights": "int4"}
    with pytest.raises(ValueError, match=r"unknown keys \['weights'\]"):
        LotionConfig.from_dict(data)


def test_zero_amplitude_is_allowed_and_is_ste():
    config = LotionConfig(method="stableqat", stableqat_amplitudes=[0.0])
    assert config.to_spec().surrogate_amplitudes == (0.0,)
    assert LotionConfig(method="ste").to_spec().surrogate_amplitudes == ()
