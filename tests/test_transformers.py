"""from_pretrained(..., quantization_config=LotionConfig(...)), save/reload in latent format, and bad input."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from conftest import build_tiny_model
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_lotion
from hf_lotion import LotionConfig, LotionLinear
from hf_lotion.quant import absmax_scales, fake_quantize_rtn

ARCHS = ["llama", "qwen2", "mistral", "opt"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def load(path, dtype=torch.float32, **config):
    quantization_config = LotionConfig(**config) if config else None
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config, dtype=dtype)


def linear_names(model):
    return {name for name, m in model.named_modules() if type(m) is nn.Linear}


def rtn_reference(float_model, bits, group_size, grid, skip=("lm_head",)):
    """The float model with every quantized linear's weight replaced by its RTN weight, by hand."""
    with torch.no_grad():
        for name, module in float_model.named_modules():
            if type(module) is nn.Linear and name not in skip:
                scales = absmax_scales(module.weight, bits, group_size, grid)
                module.weight.copy_(fake_quantize_rtn(module.weight, scales, bits, group_size))
    return float_model.eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_quantizes_and_reloads_bit_exact(arch, dtype, tiny_checkpoint, input_ids, tmp_path):
    path = tiny_checkpoint(arch, dtype)
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = load(path, dtype, bits=4, group_size=16, method="lotion")

    swapped = {name for name, _ in hf_lotion.lotion_layers(model)}
    assert swapped == linear_names(float_model) - {"lm_head"} and len(swapped) >= 12
    assert type(model.lm_head) is nn.Linear  # the output head stays in full precision by default
    assert model.dtype == dtype and all(
        layer.weight.dtype == dtype for _, layer in hf_lotion.lotion_layers(model)
    )
    for name, layer in hf_lotion.lotion_layers(model):
        assert torch.equal(layer.weight, float_model.get_submodule(name).weight)  # latent = loaded weight

    # Eval mode is the RTN model, bit for bit; train mode (LOTION) runs the latent weights.
    with torch.no_grad():
        quantized_logits = model.eval()(input_ids).logits
        expected = rtn_reference(float_model, 4, 16, "full")(input_ids).logits
        latent_logits = model.train()(input_ids).logits
    assert torch.equal(quantized_logits, expected)
    assert not torch.equal(quantized_logits, latent_logits)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == model.config.quantization_config.to_dict() and saved["format"] == "latent"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert (
            f.metadata()["hf_lotion_format"] == "latent" and f.metadata()["hf_lotion_format_version"] == "1"
        )

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert reloaded.config.quantization_config == model.config.quantization_config
    assert {n: m.spec for n, m in hf_lotion.lotion_layers(reloaded)} == {
        n: m.spec for n, m in hf_lotion.lotion_layers(model)
    }
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids).logits, quantized_logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_learned_scales_are_initialised_saved_and_reloaded(
    dtype, tiny_checkpoint, input_ids, tmp_path, caplog
):
    path = tiny_checkpoint("llama", dtype)
    model = load(path, dtype, bits=2, group_size=32, method="stableqat")
    layer = model.model.layers[1].mlp.down_proj
    assert layer.weight_scale.dtype == dtype
    assert torch.equal(layer.weight_scale.detach(), absmax_scales(layer.weight, 2, 32, "full"))
    with torch.no_grad():  # as if training had moved the scales
        for _, lotion_layer in hf_lotion.lotion_layers(model):
            lotion_layer.weight_scale.mul_(1.25)
        logits = model.eval()(input_ids).logits
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert "no learned scales" not in caplog.text
    assert torch.equal(reloaded.model.layers[1].mlp.down_proj.weight_scale, layer.weight_scale)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids).logits, logits)


def test_prepare_in_memory_model_saves_and_reloads(input_ids, tmp_path):
    model = build_tiny_model("qwen2")
    hf_lotion.prepare(model, LotionConfig(bits=3, group_size=32, method="ste"))
    assert model.is_quantized and isinstance(model.hf_quantizer, hf_lotion.LotionHfQuantizer)
    with torch.no_grad():
        logits = model.eval()(input_ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, LotionLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)
    with pytest.raises(ValueError, match="already quantized"):
        hf_lotion.prepare(reloaded, LotionConfig())


def test_training_options_change_at_reload_and_storage_options_cannot(tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint("llama"), bits=4, group_size=16, method="lotion")
    model.save_pretrained(tmp_path)
    requested = LotionConfig(bits=4, group_size=16, lotion_lambda=4.0, curvature_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=requested)
    # transformers' own merge would ignore `requested`: "The `quantization_config` from the model will be used."
    assert not [w for w in caught if "will be used" in str(w.message)]
    assert reloaded.config.quantization_config.lotion_lambda == 4.0
    penalty = hf_lotion.penalty_runtime(reloaded).penalty
    assert (penalty.strength, penalty.curvature_every) == (4.0, 2)
    assert requested.format == "latent" and reloaded.config.quantization_config is not requested
    for name, layer in hf_lotion.lotion_layers(reloaded):
        assert torch.equal(layer.weight, model.get_submodule(name).weight)

    unspecified = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=LotionConfig(lotion_lambda=2.0)
    )
    assert (
        unspecified.config.quantization_config.group_size,
        unspecified.config.quantization_config.bits,
    ) == (16, 4)

    as_stableqat = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=LotionConfig(bits=4, group_size=16, method="stableqat")
    )
    assert as_stableqat.model.layers[0].mlp.up_proj.method.name == "stableqat"
    assert hf_lotion.penalty_runtime(as_stableqat) is None

    for field, value, saved in [("bits", 3, 4), ("group_size", 32, 16), ("grid", "restricted", "full")]:
        config = LotionConfig(**({"bits": 4, "group_size": 16} | {field: value}))
        message = rf"LotionConfig\.{field}={value!r} does not match the checkpoint's {field}={saved!r}"
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)


def test_modules_to_not_convert(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    model = load(path, modules_to_not_convert=["model.layers.0", "down_proj"], group_size=16)
    names = {name for name, _ in hf_lotion.lotion_layers(model)}
    assert not any(n.startswith("model.layers.0.") for n in names)
    assert not any(n.endswith("down_proj") for n in names)
    # An explicit list replaces the default, so the head is quantized too.
    assert "lm_head" in names and "model.layers.1.mlp.up_proj" in names


def test_gpt2_conv1d_is_skipped_with_a_warning_naming_the_layers(tiny_checkpoint, caplog, input_ids):
    path = tiny_checkpoint("gpt2")
    with caplog.at_level(logging.WARNING, logger="hf_lotion"):
        model = load(path, group_size=16)
    assert "Conv1D layers stay in full precision" in caplog.text
    assert "transformer.h.0.attn.c_attn" in caplog.text and "transformer.h.1.mlp.c_proj" in caplog.text
    assert not hf_lotion.lotion_layers(model)
    assert torch.isfinite(model(input_ids).logits).all()


def test_group_size_that_does_not_divide_names_the_layer(tiny_checkpoint):
    with pytest.raises(
        ValueError,
        match=r"group_size=64 does not divide in_features=96 of layer 'model\.layers\.0\.mlp\.down_proj'",
    ):
        load(tiny_checkpoint("llama"), group_size=64)


def test_non_finite_checkpoint_weight_is_refused(tmp_path):
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[2, 5] = float("inf")
    model.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"Layer 'model\.layers\.1\.self_attn\.v_proj' has 1 non-finite weight"
    ):
        load(tmp_path, group_size=16)


def test_dequantize_gives_plain_linears_with_the_deploy_weights(tiny_checkpoint, input_ids):
    model = load(tiny_checkpoint("llama"), bits=4, group_size=16, method="ste").eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    model.dequantize()
    assert not hf_lotion.is_lotion_model(model) and getattr(model, "hf_quantizer", None) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, logits)


@pytest.mark.parametrize("method", ["lotion", "stableqat", "ste", "full_precision"])
def test_trainer_accepts_the_qat_model(method, tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint("llama"), group_size=16, method=method)
    trainer = Trainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    )
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.up_proj.weight" in trainable
    assert ("model.layers.0.mlp.up_proj.weight_scale" in trainable) == (method == "stableqat")
