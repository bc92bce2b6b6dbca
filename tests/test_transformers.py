"""from_pretrained(..., quantization_config=LotionConfig(...)), save/reload in latent format, and bad input."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
import torch
from conftest import build_tiny_model
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

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
    # 2 blocks x 4 Conv1D (c_attn 64x192, c_proj 64x64, c_fc 64x256, mlp c_proj 256x64) = 8 weights.
    count = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64)
    share = 100 * count / sum(p.numel() for p in model.parameters())
    warnings_ = [r.getMessage() for r in caplog.records if "stay in full precision" in r.getMessage()]
    assert len(warnings_) == 1, warnings_  # once, with the count and the size
    assert f"8 linear-like weight(s) with {count:,} parameters ({share:.1f}% of the model's)" in warnings_[0]
    assert "transformer.h.0.attn.c_attn.weight (Conv1D layer (64, 192))" in warnings_[0]
    # Conv1D writes its own repr, so the note sits on the parent and names the layers.
    assert "full precision: not quantized by hf_lotion: c_fc, c_proj" in repr(model.transformer.h[1].mlp)
    assert not hf_lotion.lotion_layers(model)
    assert torch.isfinite(model(input_ids).logits).all()


def test_fused_moe_experts_stay_full_precision_with_one_warning_and_a_mark(caplog):
    from transformers import MixtralConfig

    model = AutoModelForCausalLM.from_config(
        MixtralConfig(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            num_local_experts=4,
        )
    )
    with caplog.at_level(logging.WARNING, logger="hf_lotion"):
        hf_lotion.prepare(model, LotionConfig(bits=4, group_size=32, method="ste"))
    count = 2 * (4 * 64 * 64 + 4 * 64 * 32)  # per layer: gate_up (4, 64, 64) and down (4, 64, 32)
    warnings_ = [r.getMessage() for r in caplog.records if "stay in full precision" in r.getMessage()]
    assert len(warnings_) == 1 and f"4 linear-like weight(s) with {count:,} parameters" in warnings_[0]
    assert "model.layers.1.mlp.experts.down_proj (3-D weight (4, 64, 32))" in warnings_[0]
    assert "full precision: not quantized by hf_lotion" in repr(model.model.layers[0].mlp.experts)
    assert "full precision" not in repr(model.model.layers[0].self_attn)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LotionLinear)
    # The mark keeps the model picklable and copyable.
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    assert "full precision: not quantized by hf_lotion" in repr(reloaded.model.layers[1].mlp.experts)


def test_torch_convolutions_are_not_reported_as_unconverted_linears(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(32, 16))
    with caplog.at_level(logging.WARNING, logger="hf_lotion"):
        hf_lotion.prepare(model, LotionConfig(bits=4, group_size=32))
    assert "stay in full precision" not in caplog.text
    assert "full precision" not in repr(model)


def test_group_size_that_does_not_divide_names_the_layer(tiny_checkpoint):
    with pytest.raises(
        ValueError,
        match=r"group_size=64 does not divide in_features=96 of layer 'model\.layers\.0\.mlp\.down_proj'",
    ):
        load(tiny_checkpoint("llama"), group_size=64)


@pytest.mark.parametrize(
    ("hidden", "intermediate", "expected"),
    [
        pytest.param(128, 256, 128, id="128-divides"),
        pytest.param(576, 1536, 64, id="smollm2-widths"),  # SmolLM2-135M: 128 does not divide 576
        pytest.param(64, 96, 32, id="tiny-widths"),
        pytest.param(80, 200, -1, id="no-default-divides"),
    ],
)
@pytest.mark.parametrize("route", ["from_pretrained", "prepare"])
def test_default_group_size_resolves_per_model_and_is_saved(
    hidden, intermediate, expected, route, tmp_path, caplog
):
    """`LotionConfig(bits=4)` works on any widths: 128 where it divides every quantized layer, else the
    largest of 64/32/16 that does, else one scale per row; stated in a log line and saved explicitly."""
    float_model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=1,
            num_attention_heads=4 if hidden % 4 == 0 else 5,
            num_key_value_heads=1,
            vocab_size=64,
        )
    )
    float_model.save_pretrained(tmp_path / "float")
    config = LotionConfig(bits=4)
    with caplog.at_level(logging.INFO, logger="hf_lotion"):
        if route == "prepare":
            model = hf_lotion.prepare(float_model, config)
        else:
            model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    assert config.group_size is None  # the caller's object is not changed
    assert {layer.spec.group_size for _, layer in hf_lotion.lotion_layers(model)} == {expected}
    assert f"group_size=None resolved to {'one scale per row' if expected == -1 else expected}" in caplog.text
    model.save_pretrained(tmp_path / "qat")
    saved = json.loads((tmp_path / "qat" / "config.json").read_text())["quantization_config"]
    assert saved["group_size"] == expected
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    assert reloaded.config.quantization_config.group_size == expected


def _tied_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("route", ["from_pretrained", "prepare"])
def test_a_tied_head_is_refused_before_anything_changes(route, tmp_path):
    """Quantizing `lm_head` tied to the embedding used to give a packed checkpoint that cannot load."""
    model = _tied_llama()
    model.save_pretrained(tmp_path / "float")
    config = LotionConfig(bits=4, group_size=32, modules_to_not_convert=[])  # lm_head included
    message = r"Layer 'lm_head' shares its weight with 'model\.embed_tokens\.weight'.*modules_to_not_convert"
    with pytest.raises(ValueError, match=message):
        if route == "prepare":
            hf_lotion.prepare(model, config)
        else:
            AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    assert not hf_lotion.is_lotion_model(model) and getattr(model, "hf_quantizer", None) is None


def test_a_head_untied_in_memory_can_be_quantized():
    model = _tied_llama()
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    hf_lotion.prepare(model, LotionConfig(bits=4, group_size=32, modules_to_not_convert=[]))
    assert isinstance(model.lm_head, LotionLinear)


def test_a_plain_module_with_a_shared_weight_is_refused():
    model = nn.Sequential(nn.Embedding(8, 32), nn.Linear(32, 8, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match=r"Layer '1' shares its weight with '0\.weight'"):
        hf_lotion.prepare(model, LotionConfig(bits=4, group_size=32))
    assert type(model[1]) is nn.Linear


def test_a_tied_model_with_the_default_exclusions_converts_and_reloads(tmp_path, input_ids):
    model = _tied_llama()
    model.save_pretrained(tmp_path / "float")
    qat = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=LotionConfig(bits=4, group_size=32)
    ).eval()
    hf_lotion.convert(qat)
    ids = input_ids % 64
    with torch.no_grad():
        expected = qat(ids).logits
    qat.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


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
