"""LotionConfig: defaults, serialization, and the errors for bad input (field, value, allowed values)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_lotion
from hf_lotion import LotionConfig, QuantSpec


def test_defaults_resolved_by_bits_and_method():
    assert LotionConfig().grid == "full" and LotionConfig(bits=8).grid == "restricted"
    assert LotionConfig(method="stableqat").learned_scales is True
    assert LotionConfig(method="ste").learned_scales is False
    assert LotionConfig(method="stableqat").stableqat_amplitudes == [0.21]
    lotion = LotionConfig()
    assert (lotion.lotion_lambda, lotion.curvature, lotion.curvature_beta) == (1.0, "fisher", 0.99)
    assert lotion.modules_to_not_convert is None and lotion.format == "latent"
    assert not hasattr(lotion, "stableqat_amplitudes") and not hasattr(lotion, "learned_scales")


def test_options_are_the_methods_own():
    assert LotionConfig(method="ste").method_options() == {"learned_scales": False}
    assert set(LotionConfig().method_options()) == {
        "lotion_lambda",
        "curvature",
        "curvature_beta",
        "curvature_every",
    }
    assert LotionConfig(method="full_precision").method_options() == {}


def test_round_trip_through_dict_and_json():
    config = LotionConfig(
        bits=3,
        group_size=32,
        method="stableqat",
        stableqat_amplitudes=[0.1, 0.05],
        modules_to_not_convert=["lm_head", "model.layers.0"],
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["quant_method"] == "lotion" and data["stableqat_amplitudes"] == [0.1, 0.05]
    assert "lotion_lambda" not in data
    again = LotionConfig.from_dict(data)
    assert again == config and again.to_dict() == config.to_dict()
    assert "LotionConfig" in repr(config) and '"bits": 3' in str(config)


def test_packed_config_holds_storage_fields_and_method_name_only():
    config = LotionConfig(bits=3, group_size=32, lotion_lambda=4.0, curvature_every=2)
    packed = config.packed()
    assert packed.to_dict() == {
        "quant_method": "lotion",
        "bits": 3,
        "group_size": 32,
        "grid": "full",
        "method": "lotion",
        "modules_to_not_convert": None,
        "format": "packed",
    }
    assert config.format == "latent" and config.lotion_lambda == 4.0  # the original is left alone
    assert LotionConfig.from_dict(json.loads(json.dumps(packed.to_dict()))) == packed


def test_to_spec_is_the_storage_spec():
    spec = LotionConfig(bits=2, group_size=-1, method="ste").to_spec()
    assert spec == QuantSpec(bits=2, group_size=-1, grid="full")
    assert (spec.qmin, spec.qmax) == (-2, 1)


def test_old_configs_still_load():
    """config.json of 0.1 held every method's options and called the baseline "rtn"."""
    old = {
        "quant_method": "lotion", "bits": 4, "group_size": 32, "method": "rtn", "grid": "full",
        "learned_scales": False, "lotion_lambda": 1.0, "curvature": "fisher", "curvature_beta": 0.99,
        "curvature_every": 10, "stableqat_amplitudes": [0.21], "modules_to_not_convert": None, "format": "latent",
    }  # fmt: skip
    config = LotionConfig.from_dict(old)
    assert config.method == "full_precision" and config.method_options() == {}
    lotion = LotionConfig.from_dict(old | {"method": "lotion", "curvature": "gauss_newton"})
    assert lotion.curvature == "fisher" and lotion.curvature_every == 10
    assert not hasattr(lotion, "stableqat_amplitudes")
    # Up to 0.1, curvature_every applied to the Gauss-Newton estimate only: a Fisher config gets today's default.
    assert (
        LotionConfig.from_dict(old | {"method": "lotion"}).curvature_every == LotionConfig().curvature_every
    )
    stableqat = LotionConfig.from_dict(old | {"method": "stableqat", "learned_scales": True})
    assert stableqat.learned_scales is True and stableqat.stableqat_amplitudes == [0.21]
    assert LotionConfig(method="rtn").method == "full_precision"  # the old spelling, in code too


def test_reload_merge_takes_training_fields_and_refuses_storage_changes():
    saved = LotionConfig(bits=4, group_size=32, lotion_lambda=1.0)
    requested = LotionConfig(bits=4, group_size=32, lotion_lambda=4.0, curvature_every=3)
    merged = saved.merged_for_reload(requested)
    assert (merged.lotion_lambda, merged.curvature_every, merged.format) == (4.0, 3, "latent")
    assert (
        merged is not requested
        and requested.to_dict()
        == LotionConfig(bits=4, group_size=32, lotion_lambda=4.0, curvature_every=3).to_dict()
    )
    switched = saved.merged_for_reload(LotionConfig(bits=4, group_size=32, method="stableqat"))
    assert switched.method == "stableqat" and switched.learned_scales is True
    for field, value, saved_value in [("bits", 3, 4), ("group_size", 16, 32), ("grid", "restricted", "full")]:
        kwargs = {"bits": 4, "group_size": 32} | {field: value}
        with pytest.raises(
            ValueError,
            match=rf"LotionConfig\.{field}={value!r} does not match the checkpoint's {field}={saved_value!r}",
        ):
            saved.merged_for_reload(LotionConfig(**kwargs))


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
            r"LotionConfig\.method='gptq' is not supported; allowed: one of \('full_precision', 'lotion', "
            r"'stableqat', 'ste'\) \(register another with hf_lotion\.register_method\)",
        ),
        (
            {"grid": "asym"},
            r"LotionConfig\.grid='asym' is not supported; allowed: one of \('full', 'restricted'\)",
        ),
        (
            {"learned_scales": True},
            r"LotionConfig\.learned_scales=True is not supported; allowed: an option of method='\w+', not of "
            r"method='lotion', whose options are \['lotion_lambda', 'curvature', 'curvature_beta', 'curvature_every'\]",
        ),
        (
            {"method": "rtn", "learned_scales": True},
            r"LotionConfig\.learned_scales=True .* not of method='full_precision', whose options are none",
        ),
        ({"method": "ste", "learned_scales": "yes"}, r"LotionConfig\.learned_scales='yes' .* True or False"),
        (
            {"method": "ste", "lotion_lambda": 2.0},
            r"LotionConfig\.lotion_lambda=2\.0 .* an option of method='lotion', not of method='ste'",
        ),
        (
            {"lotion_lambda": -1.0},
            r"LotionConfig\.lotion_lambda=-1\.0 is not supported; allowed: a finite number >= 0",
        ),
        ({"lotion_lambda": float("nan")}, r"LotionConfig\.lotion_lambda=nan"),
        (
            {"curvature": "adam"},
            r"LotionConfig\.curvature='adam' is not supported; allowed: one of \('fisher',\)",
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
            {"method": "stableqat", "stableqat_amplitudes": [0.3]},
            r"LotionConfig\.stableqat_amplitudes=\[0\.3\] .* sum\(\|a_k\|\) < 1/\(sqrt\(2\)\*pi\)",
        ),
        ({"method": "stableqat", "stableqat_amplitudes": 0.21}, r"LotionConfig\.stableqat_amplitudes=0\.21"),
        (
            {"method": "stableqat", "stableqat_amplitudes": ["a"]},
            r"LotionConfig\.stableqat_amplitudes=\['a'\]",
        ),
        (
            {"modules_to_not_convert": "lm_head"},
            r"LotionConfig\.modules_to_not_convert='lm_head' .* a list of strings",
        ),
        (
            {"format": "gguf"},
            r"LotionConfig\.format='gguf' is not supported; allowed: one of \('latent', 'packed'\)",
        ),
        ({"quant_method": "awq"}, r"LotionConfig\.quant_method='awq' is not supported; allowed: 'lotion'"),
        (
            {"bitz": 4},
            r"LotionConfig got unknown keys \['bitz'\]; allowed keys for method='lotion': \[.*'bits'.*'lotion_lambda'.*\]",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) and len(x) < 1 else None,
)
def test_bad_values_raise_value_error_naming_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LotionConfig(**kwargs)


SAVED = {
    "latent": LotionConfig(bits=3, group_size=32, lotion_lambda=2.0, modules_to_not_convert=["lm_head"]),
    "packed": LotionConfig(bits=3, group_size=32, method="stableqat").packed(),
}


@pytest.mark.parametrize(
    "format,extra",
    [
        ("latent", {"lotion_warmup_steps": 100}),  # a training option of a newer release
        ("latent", {"hadamard_blocks": 64, "muon_beta": 0.9}),  # options of methods this version lacks
        ("packed", {"lotion_warmup_steps": 100}),
    ],
    ids=["latent-newer-option", "latent-other-methods-options", "packed-newer-option"],
)
def test_unknown_keys_in_saved_config_warn_and_are_ignored(format, extra, caplog):
    known = json.loads(json.dumps(SAVED[format].to_dict()))
    with caplog.at_level(logging.WARNING, logger="hf_lotion.config"):
        config = LotionConfig.from_dict(known | extra)
    assert config.to_dict() == known and config == SAVED[format]
    warnings = [r for r in caplog.records if r.name == "hf_lotion.config"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert str(sorted(extra)) in warnings[0].getMessage()
    with pytest.raises(ValueError, match=r"unknown keys"):  # in code, a wrong option is still an error
        LotionConfig(**known, **extra)


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            {"format_version": 2},
            r"LotionConfig\.format_version=2 is not supported; allowed: an integer from 1 to 1\. .*"
            r"upgrade hf-lotion",
        ),
        ({"format_version": "1"}, r"LotionConfig\.format_version='1' .* upgrade hf-lotion"),
        (
            {"format": "packed_v2"},
            r"LotionConfig\.format='packed_v2' is not supported; allowed: one of \('latent', 'packed'\)\. .*"
            r"upgrade hf-lotion",
        ),
        ({"bits": 5}, r"LotionConfig\.bits=5 is not supported"),  # storage fields are never ignored
        ({"grid": "nf4"}, r"LotionConfig\.grid='nf4' is not supported"),
        (
            {"method": "lotion_v2"},
            r"LotionConfig\.method='lotion_v2' \(saved in the checkpoint\) is not supported.*upgrade hf-lotion",
        ),
    ],
    ids=[
        "newer-format-version",
        "format-version-not-int",
        "unknown-format",
        "bad-bits",
        "unknown-grid",
        "unknown-method",
    ],
)
def test_saved_config_of_a_newer_storage_format_is_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        LotionConfig.from_dict(LotionConfig().to_dict() | extra)


def test_saved_config_at_this_format_version_loads():
    assert LotionConfig.from_dict(SAVED["latent"].to_dict() | {"format_version": 1}) == SAVED["latent"]


@pytest.mark.parametrize("format", ["latent", "packed"])
def test_checkpoint_whose_config_has_an_unknown_key_loads_and_warns(
    format, tiny_checkpoint, tmp_path, caplog
):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint("llama"), quantization_config=LotionConfig(bits=4, group_size=16)
    )
    if format == "packed":
        hf_lotion.convert(model)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    saved = dict(config["quantization_config"])
    config["quantization_config"]["lotion_warmup_steps"] = 100
    config_file.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="hf_lotion.config"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.to_dict() == saved
    layer = {"latent": hf_lotion.LotionLinear, "packed": hf_lotion.PackedLinear}[format]
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, layer)
    assert torch.equal(
        reloaded.state_dict()["model.layers.0.mlp.up_proj.weight"],
        model.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )
    warnings = [r for r in caplog.records if r.name == "hf_lotion.config"]
    assert len(warnings) == 1 and "['lotion_warmup_steps']" in warnings[0].getMessage()


def test_zero_amplitude_is_allowed_and_is_ste():
    config = LotionConfig(method="stableqat", stableqat_amplitudes=[0.0])
    assert config.build_method().surrogate().kernel_amplitudes == (0.0,)
    assert LotionConfig(method="ste").build_method().surrogate().kernel_amplitudes == ()
