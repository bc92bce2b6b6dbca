"""`LotionConfig(scale_dtype=...)`: scales rounded to a dtype in every forward; validation, saving, exactness."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM

import hf_lotion
from hf_lotion import LotionConfig, kernels, prepare
from hf_lotion.quant import effective_scale_dtype, gradient_window, round_scales

METHODS = ["ste", "stableqat", "lotion", "full_precision"]


def fp16_values(scales: torch.Tensor) -> bool:
    return torch.equal(scales.to(torch.float16).to(scales.dtype), scales)


@pytest.mark.parametrize("value", ["fp16", "half", torch.float16, 16, ""], ids=repr)
def test_invalid_scale_dtype_is_refused(value):
    with pytest.raises(ValueError) as error:
        LotionConfig(scale_dtype=value)
    message = str(error.value)
    assert f"LotionConfig.scale_dtype={value!r}" in message
    assert "allowed: None (the compute dtype) or one of ('float16', 'bfloat16', 'float32')" in message


def test_scale_dtype_round_trips_and_is_fixed_at_reload():
    config = LotionConfig(bits=4, group_size=32, scale_dtype="float16")
    data = json.loads(json.dumps(config.to_dict()))
    assert data["scale_dtype"] == "float16"
    assert LotionConfig.from_dict(data) == config and LotionConfig.from_dict(data).scale_dtype == "float16"
    assert config.packed().scale_dtype == "float16" and config.packed().to_dict()["scale_dtype"] == "float16"
    assert "scale_dtype" not in LotionConfig(bits=4).to_dict()  # configs without it stay as they were
    assert config.to_spec().scale_dtype == "float16"
    assert config.merged_for_reload(LotionConfig(method="ste")).scale_dtype == "float16"
    with pytest.raises(ValueError, match=r"scale_dtype='bfloat16' does not match the checkpoint's"):
        config.merged_for_reload(LotionConfig(scale_dtype="bfloat16"))


def test_round_scales():
    s = torch.tensor([0.1, 1e-12, 1e6, 3.0])
    rounded = round_scales(s, "float16")
    assert rounded.tolist() == [0.0999755859375, 2.0**-24, 65504.0, 3.0]  # fp16 values, kept positive, finite
    assert round_scales(s, None) is s
    # bf16 compute, fp16 scales: rounded to fp16 then bf16, so the values are in both dtypes.
    b = round_scales(torch.tensor([0.1, 0.3337], dtype=torch.bfloat16), "float16")
    assert fp16_values(b) and b.dtype == torch.bfloat16
    assert effective_scale_dtype(torch.float32, "float16") == torch.float16
    assert effective_scale_dtype(torch.bfloat16, "float16") == torch.bfloat16
    assert effective_scale_dtype(torch.float32, None) == torch.float32


def train(model, steps=3, seed=0):
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, 96, (4, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_fp16_scales_and_stays_bit_exact(method, input_ids, tmp_path):
    model = prepare(
        build_tiny_model("llama"), LotionConfig(bits=4, group_size=32, method=method, scale_dtype="float16")
    )
    train(model)
    layers = hf_lotion.lotion_layers(model)
    for name, layer in layers:
        assert fp16_values(layer.quant_scales().detach()), name
        assert fp16_values(layer.quantize_weight()[1]), name
    gguf = pytest.importorskip("gguf")
    path = hf_lotion.export_gguf(model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name == "blk.1.ffn_down.weight":
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            assert torch.equal(torch.from_numpy(data), model.model.layers[1].mlp.down_proj.deploy_weight())
    with torch.no_grad():
        expected = model(input_ids).logits
    hf_lotion.convert(model)
    model.save_pretrained(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
        assert torch.equal(reloaded(input_ids).logits, expected)
    assert reloaded.config.quantization_config.scale_dtype == "float16"


def test_compressed_tensors_export_stays_bit_exact(input_ids, tmp_path):
    pytest.importorskip("compressed_tensors")
    config = LotionConfig(bits=4, group_size=32, method="stableqat", scale_dtype="float16")
    model = train(prepare(build_tiny_model("llama"), config))
    hf_lotion.convert(model)
    out = hf_lotion.export_compressed_tensors(model, tmp_path / "ct")
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_latent_checkpoint_keeps_scale_dtype(input_ids, tmp_path):
    config = LotionConfig(bits=4, group_size=32, method="stableqat", scale_dtype="float16")
    model = train(prepare(build_tiny_model("llama"), config))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config.scale_dtype == "float16"
    assert reloaded.model.layers[0].self_attn.q_proj.spec.scale_dtype == "float16"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_learned_scales_get_a_gradient_through_the_rounding():
    model = prepare(
        build_tiny_model("llama"),
        LotionConfig(bits=4, group_size=32, method="stableqat", scale_dtype="float16"),
    )
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight_scale.mul_(1.0001)  # not fp16 values any more: the forward must round them
    assert not fp16_values(layer.weight_scale.detach())
    model.train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grad = layer.weight_scale.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert fp16_values(layer.quant_scales().detach())


def test_bf16_compute_with_fp16_scales(input_ids):
    model = prepare(
        build_tiny_model("llama", dtype=torch.bfloat16),
        LotionConfig(bits=4, group_size=32, method="ste", scale_dtype="float16"),
    )
    for name, layer in hf_lotion.lotion_layers(model):
        scales = layer.quant_scales()
        assert scales.dtype == torch.bfloat16 and fp16_values(scales), name


def test_default_scales_are_unchanged():
    model = prepare(build_tiny_model("llama"), LotionConfig(bits=4, group_size=32, method="ste"))
    layer = model.model.layers[0].mlp.up_proj
    expected = hf_lotion.quant.absmax_scales(layer.weight, 4, 32, "full")
    assert torch.equal(layer.quant_scales(), expected) and not fp16_values(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_kernel_matches_the_reference_with_fp16_scales(dtype):
    """The interpreter's fake-quant forward and backward (gradient window widened by fp16 ulps) match the reference."""
    generator = torch.Generator().manual_seed(0)
    w = (torch.randn(8, 64, generator=generator) * 0.05).to(dtype)
    scales = round_scales(hf_lotion.quant.absmax_scales(w, 4, 32, "full"), "float16")
    high = gradient_window(4, effective_scale_dtype(dtype, "float16"))[1]
    assert high - 7.5 >= 8 * torch.finfo(torch.float16).eps - 1e-9 or dtype == torch.bfloat16
    results = []
    for backend in ("reference", "triton"):
        weight = w.clone().requires_grad_(True)
        s = scales.clone().requires_grad_(True)
        with kernels.kernel_backend(backend):
            out = kernels.fake_quantize(weight, s, 4, 32, (0.21,), "float16")
        out.backward(torch.ones_like(out))
        results.append((out.detach(), weight.grad, s.grad))
    (out_ref, gw_ref, gs_ref), (out_tri, gw_tri, gs_tri) = results
    assert torch.equal(out_tri, out_ref)
    torch.testing.assert_close(gw_tri.float(), gw_ref.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gs_tri.float(), gs_ref.float(), atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("reloaded", [False, True], ids=["converted", "reloaded"])
def test_requantizing_a_packed_layer_keeps_its_scale_dtype(reloaded, tiny_checkpoint, tmp_path):
    """Merging adapters into a packed base refits groups that no longer fit: their scales round like training's."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint("llama"),
        quantization_config=LotionConfig(bits=4, group_size=32, scale_dtype="float16"),
    )
    hf_lotion.convert(model)
    if reloaded:
        model.save_pretrained(tmp_path)
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = next(m for m in model.modules() if isinstance(m, hf_lotion.PackedLinear))
    assert layer.scale_dtype == "float16"
    torch.manual_seed(0)
    weight = layer.dequantized_weight() * (1 + torch.rand(layer.out_features, 1))  # every group grows
    before = layer.weight_scale.clone()
    layer.requantize_(weight)
    assert not torch.equal(layer.weight_scale, before) and fp16_values(layer.weight_scale)


@pytest.mark.parametrize(
    "compute,scale_dtype",
    [(torch.bfloat16, "float16"), (torch.float16, "bfloat16")],
    ids=["bf16-fp16", "fp16-bf16"],
)
def test_huge_scales_stay_finite_in_both_dtypes(compute, scale_dtype):
    rounded = round_scales(
        torch.tensor([1e30 if compute == torch.bfloat16 else 65504.0, 1.0], dtype=compute), scale_dtype
    )
    # 65280 = 255 * 256: the largest value bf16 and fp16 both hold (fp16's max, 65504, is 65536 in bf16).
    assert rounded.tolist() == [65280.0, 1.0]
    assert torch.isfinite(rounded.to(getattr(torch, scale_dtype))).all()
