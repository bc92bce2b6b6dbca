"""convert -> save -> reload bit-exact, sizes on disk, and broken checkpoints (export: test_exports.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_lotion
from hf_lotion import LotionConfig, PackedLinear
from hf_lotion.kernels import kernel_backend


def qat_model(path, dtype=torch.float32, **config):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=LotionConfig(**config), dtype=dtype
    ).eval()


def packed_checkpoint(tmp_path, tiny_checkpoint, **config):
    model = qat_model(tiny_checkpoint("llama"), **({"bits": 4, "group_size": 16} | config))
    hf_lotion.convert(model)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,group_size", [(2, -1), (3, 16), (4, 32), (8, 32)], ids=str)
def test_convert_save_reload_is_bit_exact(bits, group_size, dtype, tiny_checkpoint, input_ids, tmp_path):
    """On the reference path (the CPU int4 kernel's products agree to rounding: tests/test_cpu_int4.py)."""
    model = qat_model(tiny_checkpoint("llama", dtype), dtype, bits=bits, group_size=group_size, method="ste")
    with torch.no_grad():
        qat_logits = model(input_ids).logits
    quantized = {name for name, _ in hf_lotion.lotion_layers(model)}
    hf_lotion.convert(model)
    assert model.config.quantization_config.format == "packed" and not hf_lotion.is_lotion_model(model)
    with torch.no_grad(), kernel_backend("reference"):
        assert torch.equal(model(input_ids).logits, qat_logits)

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata()["hf_lotion_format"] == "packed"
        for name in quantized:  # integers and scales only for quantized layers
            assert f.get_slice(f"{name}.weight").get_dtype() == "I32"
            assert (
                f.get_slice(f"{name}.weight_scale").get_dtype()
                == {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
            )
        assert f.get_slice("lm_head.weight").get_dtype() != "I32"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert {n for n, m in reloaded.named_modules() if isinstance(m, PackedLinear)} == quantized
    assert not hf_lotion.is_lotion_model(reloaded)
    with torch.no_grad(), kernel_backend("reference"):
        assert torch.equal(reloaded(input_ids).logits, qat_logits)


def test_sharded_packed_checkpoint_reloads(tiny_checkpoint, input_ids, tmp_path):
    model = packed_checkpoint(tmp_path / "one", tiny_checkpoint)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_converted_bias_is_a_trainable_copy_like_the_reloaded_one(dtype, tiny_checkpoint, tmp_path):
    model = qat_model(tiny_checkpoint("qwen2", dtype), dtype, bits=4, group_size=16)
    qat_biases = {
        name: layer.bias for name, layer in hf_lotion.lotion_layers(model) if layer.bias is not None
    }
    assert qat_biases  # qwen2's q/k/v projections have biases
    values = {name: bias.detach().clone() for name, bias in qat_biases.items()}
    hf_lotion.convert(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    for name, qat_bias in qat_biases.items():
        converted, loaded = model.get_submodule(name).bias, reloaded.get_submodule(name).bias
        assert qat_bias.requires_grad and converted is not qat_bias  # from_qat leaves its source alone
        assert converted.requires_grad and loaded.requires_grad, name
        assert converted.dtype == loaded.dtype == dtype
        assert torch.equal(converted, values[name]) and torch.equal(loaded, values[name])


def test_packed_size_on_disk_4bit_group128(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    hf_lotion.prepare(model, LotionConfig(bits=4, group_size=128))
    layers = {name: (m.out_features, m.in_features) for name, m in hf_lotion.lotion_layers(model)}
    hf_lotion.convert(model)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for name, (out_features, in_features) in layers.items():
            stored = 0
            for suffix in ("weight", "weight_scale", "weight_shape"):
                t = f.get_tensor(f"{name}.{suffix}")
                stored += t.numel() * t.element_size()
            bf16 = out_features * in_features * 2
            scale_bytes = out_features * (in_features // 128) * 2
            assert stored <= 1.05 * (bf16 * 4 / 16 + scale_bytes), name


def test_convert_leaves_the_callers_config_alone_and_saves_storage_fields_only(tiny_checkpoint, tmp_path):
    config = LotionConfig(bits=4, group_size=32, method="lotion", lotion_lambda=3.0)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)
    hf_lotion.convert(model)
    assert config.format == "latent" and config.lotion_lambda == 3.0  # reusable for the next model
    assert model.config.quantization_config.format == "packed"
    assert model.hf_quantizer.quantization_config is model.config.quantization_config
    assert hf_lotion.penalty_runtime(model) is None
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {
        "quant_method": "lotion",
        "bits": 4,
        "group_size": 32,
        "grid": "full",
        "method": "lotion",
        "modules_to_not_convert": None,
        "format": "packed",
    }
    other = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)
    assert hf_lotion.penalty_runtime(other).penalty.strength == 3.0


def test_packed_checkpoint_without_hf_lotion_fails_loudly(tiny_checkpoint, tmp_path):
    packed_checkpoint(tmp_path, tiny_checkpoint)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Unknown quantization type, got lotion" in result.stderr
    assert "size mismatch" in result.stderr.lower() or "ignore_mismatched_sizes" in result.stderr


def rewrite(path, tensors=None, metadata=None, drop=()):
    data = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    data = {k: v for k, v in (tensors or data).items() if k not in drop}
    save_file(data, path, metadata=meta | (metadata or {}))


def saved_checkpoint(path, tiny_checkpoint, format, **save_kwargs):
    """A tiny lotion checkpoint in `format` ("latent": as trained, "packed": after convert)."""
    model = qat_model(tiny_checkpoint("llama"), bits=4, group_size=16)
    if format == "packed":
        hf_lotion.convert(model)
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.mark.parametrize("shards", ["one-file", "sharded"])
@pytest.mark.parametrize("format", ["latent", "packed"])
def test_truncated_file_is_refused(format, shards, tiny_checkpoint, tmp_path):
    saved_checkpoint(
        tmp_path, tiny_checkpoint, format, **({"max_shard_size": "20KB"} if shards == "sharded" else {})
    )
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 2) == (shards == "sharded")
    file = files[len(files) // 2]  # a shard in the middle: every shard is checked, not the first one only
    os.truncate(file, file.stat().st_size - 100)
    with pytest.raises(ValueError, match=rf"{re.escape(file.name)}' is truncated or corrupted"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("format", ["latent", "packed"])
def test_corrupted_header_is_refused(format, tiny_checkpoint, tmp_path):
    saved_checkpoint(tmp_path, tiny_checkpoint, format)
    file = tmp_path / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[8:24] = b"\xff" * 16
    file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors' is not a readable safetensors file"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_scale_tensor_is_refused(tiny_checkpoint, tmp_path):
    packed_checkpoint(tmp_path, tiny_checkpoint)
    rewrite(tmp_path / "model.safetensors", drop={"model.layers.1.mlp.up_proj.weight_scale"})
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight_scale'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value", [("bits", 2), ("group_size", 32)])
def test_config_that_disagrees_with_tensors_is_refused(field, value, tiny_checkpoint, tmp_path):
    packed_checkpoint(tmp_path, tiny_checkpoint)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"][field] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"Tensor 'model\.layers\.0\.\S+' in '.*model\.safetensors' has dtype .* the config"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("format", ["latent", "packed"])
def test_newer_format_version_is_refused(format, tiny_checkpoint, tmp_path):
    saved_checkpoint(tmp_path, tiny_checkpoint, format)
    rewrite(tmp_path / "model.safetensors", metadata={"hf_lotion_format_version": "2"})
    with pytest.raises(ValueError, match=r"format version 2; this hf-lotion reads versions up to 1"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_convert_and_export_refuse_wrong_models(tiny_checkpoint, tmp_path):
    plain = build_tiny_model("llama")
    with pytest.raises(ValueError, match="no LotionLinear layer to pack"):
        hf_lotion.convert(plain)
    with pytest.raises(ValueError, match=r"call hf_lotion\.convert\(model\) first"):
        hf_lotion.export_compressed_tensors(qat_model(tiny_checkpoint("llama"), group_size=16), tmp_path)
    with pytest.raises(ValueError, match=r"format='packed' describes a converted checkpoint"):
        qat_model(tiny_checkpoint("llama"), group_size=16, format="packed")
    with pytest.raises(ValueError, match=r"prepare\(\) needs LotionConfig\.format='latent'"):
        hf_lotion.prepare(nn.Sequential(nn.Linear(16, 4)), LotionConfig(group_size=16, format="packed"))
