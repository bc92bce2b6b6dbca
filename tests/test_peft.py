"""PEFT on hf_lotion models: QAT adapters `Q(W + s B A)` with plain `peft.get_peft_model`, an exact merge, the
whole adapter lifecycle, adapters over a packed base, and bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_tiny_model
from lotion_paths import word_tokenizer
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_lotion
from hf_lotion import LotionConfig
from hf_lotion.adapters.lora import LotionLoraLinear, PackedLoraLinear
from hf_lotion.kernels import kernel_backend
from hf_lotion.quant import absmax_scales, fake_quantize_rtn

METHODS = ["ste", "stableqat", "lotion"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def qat_model(method="ste", bits=4, dtype=torch.float32, seed=0, **options):
    model = build_tiny_model("llama", seed=seed, dtype=dtype)
    return hf_lotion.prepare(model, LotionConfig(bits=bits, group_size=32, method=method, **options))


def lora(**overrides) -> LoraConfig:
    # init_lora_weights=False: B is random too, so the adapters change the weight from the first step.
    return LoraConfig(
        **({"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False} | overrides)
    )


def ids(seed=1, n=4):
    return torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=3, lr=1e-2, seed=1):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        batch = ids(seed + step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def logits(model, batch=None):
    batch = ids(7) if batch is None else batch
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch).logits


# -- QAT adapters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_plain_get_peft_model_gives_qat_adapters_computing_q_of_w_plus_ba(method):
    model = get_peft_model(qat_model(method), lora())
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LotionLoraLinear)
    base = layer.get_base_layer()
    x = torch.randn(3, base.in_features)
    effective = (
        base.weight + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2.0
    )  # alpha / r
    scales = (
        layer.lora_weight_scale["default"] if method == "stableqat" else absmax_scales(effective, 4, 32)
    ).detach()
    expected = F.linear(x, fake_quantize_rtn(effective.detach(), scales, 4, 32), base.bias)
    model.eval()
    assert torch.equal(layer(x), expected)  # eval: the RTN weight of W + s B A, not Q(W) x + s B A x
    plain = F.linear(x, fake_quantize_rtn(base.weight, absmax_scales(base.weight, 4, 32), 4, 32)) + (
        x @ (effective - base.weight).T
    )
    assert not torch.allclose(layer(x), plain, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_then_convert_is_bit_exact(method, dtype, tiny_checkpoint, tmp_path):
    """The trained adapter model in eval mode and the packed model after merge + convert (+ save/reload)
    give the same logits, bit for bit."""
    config = LotionConfig(bits=4, group_size=32, method=method)
    # Loaded, not cast with .to(dtype), so that its rotary buffers match the reloaded model's.
    qat = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint("llama"), dtype=dtype, quantization_config=config
    )
    model = train_steps(get_peft_model(qat, lora()))
    expected = logits(model)
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].mlp.up_proj).__name__ == "LotionLinear"
    hf_lotion.convert(merged)
    # The reference path: the CPU int4 kernel's products agree to rounding (tests/test_cpu_kernels.py).
    with kernel_backend("reference"):
        assert torch.equal(logits(merged), expected)
        merged.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert torch.equal(logits(reloaded), expected)


def test_learned_scales_are_the_adapters_own_trained_saved_and_merged(tmp_path):
    model = get_peft_model(qat_model("stableqat"), lora())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_weight_scale.default" in n for n in trainable)
    assert not any(n.endswith(".weight_scale") for n in trainable)  # the base's stay frozen
    train_steps(model)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    trained = layer.lora_weight_scale["default"].detach().clone()
    assert not torch.equal(trained, layer.get_base_layer().weight_scale)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.model.layers.1.self_attn.q_proj.lora_weight_scale"], trained)
    expected = logits(model)
    reloaded = PeftModel.from_pretrained(qat_model("stableqat"), tmp_path)  # no extra step
    assert torch.equal(logits(reloaded), expected)
    adapters = {
        name: module.lora_weight_scale["default"].detach().clone()
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LotionLoraLinear)
    }
    merged = model.merge_and_unload()
    for name, scales in adapters.items():  # every layer now holds its adapter's trained scales
        assert torch.equal(merged.get_submodule(name).weight_scale, scales), name


def test_lotion_penalty_and_curvature_act_on_the_adapter_weights():
    """LOTION's penalty reaches A and B through the effective weight; the curvature is estimated there."""
    grads = {}
    for strength in (0.0, 100.0):
        model = get_peft_model(qat_model("lotion", lotion_lambda=strength), lora())
        batch = ids(3)
        model.train()
        model(input_ids=batch, labels=batch).loss.backward()
        layer = model.base_model.model.model.layers[0].mlp.down_proj
        grads[strength] = layer.lora_A["default"].weight.grad.clone()
        if strength:
            runtime = hf_lotion.penalty_runtime(model)
            assert runtime.pop_penalty() > 0
            torch.optim.SGD(model.parameters(), lr=0.0).step()  # ends the step: the curvature is folded
            assert runtime.updates == 1 and runtime.ema["model.layers.0.mlp.down_proj"].abs().sum() > 0
    assert not torch.allclose(grads[0.0], grads[100.0])


def test_disable_adapter_several_adapters_and_set_adapter():
    model = get_peft_model(qat_model("ste"), lora(), adapter_name="first")
    base_logits = None
    with model.disable_adapter():
        base_logits = logits(model)
    plain = qat_model("ste")
    assert torch.equal(base_logits, logits(plain))  # the base's own Q(W)
    model.add_adapter("second", lora(r=2))
    first = logits(model)
    model.set_adapter("second")
    second = logits(model)
    assert not torch.equal(first, second)
    model.set_adapter("first")
    assert torch.equal(logits(model), first)
    train_steps(model)  # trains "first" only
    model.set_adapter("second")
    assert torch.equal(logits(model), second)


def test_trainers_train_qat_adapters(tmp_path):
    """Plain Trainer, LotionTrainer and TRL's SFTTrainer each train the adapters (and only them)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from hf_lotion.trainer.recipes import CausalLMBlocks

    data = CausalLMBlocks(ids(5, n=16))
    common = dict(
        max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], save_strategy="no"
    )
    runs = {
        "Trainer": lambda m: Trainer(
            model=m, args=TrainingArguments(str(tmp_path / "t"), **common), train_dataset=data
        ),
        "LotionTrainer": lambda m: hf_lotion.LotionTrainer(
            model=m, args=TrainingArguments(str(tmp_path / "l"), **common), train_dataset=data
        ),
        "SFTTrainer": lambda m: SFTTrainer(
            model=m,
            args=SFTConfig(str(tmp_path / "s"), bf16=False, max_length=None, eos_token=None, **common),
            train_dataset=Dataset.from_dict({"input_ids": [row.tolist() for row in ids(5, n=16)]}),
            processing_class=word_tokenizer(VOCAB),
        ),
    }
    for name, make in runs.items():
        model = get_peft_model(qat_model("lotion"), lora())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        make(model).train()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all("lora_" in n for n in changed), (name, sorted(changed)[:4])


# -- adapters over a packed base ------------------------------------------------------------------------------


@pytest.fixture
def packed_dir(tmp_path):
    model = hf_lotion.convert(train_steps(qat_model("ste")))
    model.save_pretrained(tmp_path / "packed")
    return tmp_path / "packed"


def test_lora_over_a_packed_base_forward_training_save_reload_disable(packed_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(packed_dir), lora(lora_dropout=0.1))
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]  # peft's "at your own risk"
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, PackedLoraLinear)
    base = layer.get_base_layer()
    x = torch.randn(3, base.in_features)
    model.eval()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2.0
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T, rtol=1e-5, atol=1e-6)
    packed_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("weight", "weight_scale"))}
    train_steps(model)
    assert all(torch.equal(b, packed_before[n]) for n, b in model.named_buffers() if n in packed_before)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(packed_dir), tmp_path / "adapter"
    )
    assert torch.equal(logits(reloaded), expected)
    with reloaded.disable_adapter():
        assert torch.equal(logits(reloaded), logits(AutoModelForCausalLM.from_pretrained(packed_dir)))


def test_packed_base_backward_saves_no_dequantized_weight(packed_dir):
    """The frozen low-bit base is dequantized again in backward, never kept between forward and backward."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(packed_dir), lora())
    packed = [m for m in model.modules() if isinstance(m, hf_lotion.PackedLinear)]
    weight_shapes = {(m.out_features, m.in_features) for m in packed}
    weight_shapes |= {(i, o) for o, i in weight_shapes}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        # The float head saves its own weight; integer tensors are the low-bit base (words or the CPU kernel's).
        if tensor.is_floating_point() and tensor.untyped_storage().data_ptr() not in parameters:
            saved.append(tuple(tensor.shape))
        return tensor

    model.train()
    batch = ids(2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert saved and not (set(saved) & weight_shapes), sorted(set(saved) & weight_shapes)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_merging_into_a_packed_base_needs_opting_in_and_warns(packed_dir, caplog):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(packed_dir), lora())
    train_steps(model)
    lora_layer = model.base_model.model.model.layers[0].mlp.up_proj
    dequantized_before = lora_layer.get_base_layer().dequantized_weight()
    scales_before = lora_layer.get_base_layer().weight_scale.clone()
    with torch.no_grad():
        delta_before = lora_layer.get_delta_weight("default")
    before = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(ValueError, match=r"re-quantizes .* hf_lotion\.requantizing_merge\(\)"):
        model.merge_and_unload()
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    expected = logits(model)
    with caplog.at_level(logging.WARNING, logger="hf_lotion"), hf_lotion.requantizing_merge():
        merged = model.merge_and_unload()
    assert "re-quantizing" in caplog.text
    # Each layer holds RTN(dequantize(W) + s B A): groups whose merged weights still round into the range
    # keep their scale, the others get the absmax scale of their merged weights.
    layer = merged.model.layers[0].mlp.up_proj
    assert isinstance(layer, hf_lotion.PackedLinear)
    merged_weight = dequantized_before + delta_before
    v = merged_weight.reshape(merged_weight.shape[0], -1, 32) / scales_before.unsqueeze(-1)
    fits = ((v >= -8.5) & (v <= 7.5)).all(dim=-1)
    scales = torch.where(fits, scales_before, absmax_scales(merged_weight, 4, 32))
    assert fits.any() and not fits.all()  # both cases occur in this layer
    assert torch.equal(layer.weight_scale, scales)
    assert torch.equal(layer.dequantized_weight(), fake_quantize_rtn(merged_weight, scales, 4, 32))
    assert not torch.equal(logits(merged), expected)


# -- bad input -------------------------------------------------------------------------------------------------


def _unchanged(model, action, match):
    before = repr(model)
    with pytest.raises(ValueError, match=match):
        action()
    assert repr(model) == before and not any("lora_" in n for n, _ in model.named_modules())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        pytest.param(
            lora(target_modules=["q_proj", "lm_head"]),
            r"LoRA targets \['lm_head'\] are not quantized layers.*for example model\.layers\.0",
            id="target-not-quantized",
        ),
        pytest.param(
            lora(r=40), r"LoraConfig\.r=40 is larger than layer .* allows .*allowed: 1 to 32", id="rank"
        ),
        pytest.param(lora(lora_dropout=0.1), r"LoraConfig\.lora_dropout=0\.1 .*allowed: 0\.0", id="dropout"),
        pytest.param(lora(use_dora=True), r"LoraConfig\.use_dora=True .*a LoRA variant", id="dora"),
        pytest.param(
            lora(init_lora_weights="pissa"), r"init_lora_weights='pissa'.*rewrites the base", id="pissa"
        ),
        pytest.param(
            IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
            r"IA3Config adapters .* peft\.LoraConfig",
            id="ia3",
        ),
    ],
)
def test_bad_adapter_configs_are_refused_before_anything_changes(config, match):
    model = qat_model("ste", modules_to_not_convert=["lm_head"])
    _unchanged(model, lambda: get_peft_model(model, config), match)


def test_an_adapter_for_another_grid_is_refused(tmp_path):
    model = get_peft_model(qat_model("ste", bits=4), lora())
    model.save_pretrained(tmp_path)
    other = qat_model("ste", bits=2)
    with pytest.raises(
        ValueError, match=r"trained for QAT adapters on a latent LotionLinear, bits=4.*bits=2"
    ):
        PeftModel.from_pretrained(other, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4


def test_a_qat_adapter_is_refused_on_a_packed_base(packed_dir, tmp_path):
    model = get_peft_model(qat_model("ste"), lora())
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(
        ValueError, match=r"trained for QAT adapters .* this layer is adapters on a packed base"
    ):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(packed_dir), tmp_path / "adapter")


@pytest.mark.parametrize("order", ["hf_lotion-first", "peft-first", "peft-found-before-import"])
def test_qat_adapters_whatever_the_import_order(order):
    """`import hf_lotion` does not import peft; the LoRA layers are wired in when peft is imported,
    also after an availability check (`find_spec`, as transformers does) that imports nothing."""
    imports = {
        "hf_lotion-first": "import hf_lotion\nassert 'peft' not in sys.modules\nimport peft\n",
        "peft-first": "import peft\nimport hf_lotion\n",
        "peft-found-before-import": (
            "import importlib.util\nimport hf_lotion\nassert importlib.util.find_spec('peft')\n"
            "assert 'peft' not in sys.modules\nimport peft\n"
        ),
    }[order]
    script = (
        "import sys\n" + imports + "import torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,"
        " num_attention_heads=4, vocab_size=64))\n"
        "hf_lotion.prepare(model, hf_lotion.LotionConfig(bits=4, group_size=32, method='ste'))\n"
        "model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules='all-linear'))\n"
        "print(type(model.base_model.model.model.layers[0].mlp.up_proj).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "LotionLoraLinear"


def test_lotion_trainer_keeps_adapter_scales_out_of_weight_decay(tmp_path):
    from transformers import TrainingArguments

    model = get_peft_model(qat_model("stableqat"), lora())
    args = TrainingArguments(str(tmp_path), weight_decay=0.1, report_to=[], use_cpu=True)
    decayed = set(hf_lotion.LotionTrainer(model=model, args=args).get_decay_parameter_names(model))
    assert any("lora_A" in name for name in decayed)
    assert not any("weight_scale" in name for name in decayed)


def test_convert_and_push_refuse_a_model_that_still_has_adapters():
    model = get_peft_model(qat_model("ste"), lora())
    with pytest.raises(ValueError, match=r"LoRA adapters on its quantized layers .*merge_and_unload\(\)"):
        hf_lotion.convert(model)
    assert isinstance(
        model.base_model.model.model.layers[0].mlp.up_proj.get_base_layer(), hf_lotion.LotionLinear
    )
    with pytest.raises(ValueError, match=r"carries PEFT adapters.*merge_and_unload"):
        hf_lotion.push_to_hub(model, "me/x")


def test_transformers_load_adapter_of_another_grid_is_refused_when_used(tmp_path):
    """transformers' own loader writes the adapter buffers without peft's state-dict hook: the adapter's
    recorded grid is checked when it is first used."""
    get_peft_model(qat_model("ste", bits=4), lora()).save_pretrained(tmp_path)
    other = qat_model("ste", bits=2)
    batch = ids(2)
    with pytest.raises(
        ValueError, match=r"trained for QAT adapters on a latent LotionLinear, bits=4.*bits=2"
    ):
        other.load_adapter(str(tmp_path))
        other(input_ids=batch)


def test_the_callers_lora_config_is_not_changed_and_can_be_reused():
    config = lora()
    get_peft_model(qat_model("ste"), config)
    assert config.target_modules == "all-linear" and not config._custom_modules
    second = get_peft_model(qat_model("stableqat", seed=1), config)
    assert isinstance(second.base_model.model.model.layers[1].self_attn.v_proj, LotionLoraLinear)


def test_the_merge_is_exact_under_bf16_autocast_too():
    model = train_steps(get_peft_model(qat_model("ste"), lora()))
    batch = ids(4)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=batch).logits
        merged = hf_lotion.convert(model.merge_and_unload())
        assert torch.equal(merged(input_ids=batch).logits, expected)


@pytest.mark.parametrize("bits", [2, 4])
def test_merging_a_zero_adapter_into_a_packed_base_changes_nothing(bits, tmp_path):
    """Re-quantizing weights that are already on the grid keeps them (refitting every group to absmax would
    rescale them: on the full grid a quantized group's absmax is not the one its scale was fitted to)."""
    hf_lotion.convert(qat_model("ste", bits=bits)).save_pretrained(tmp_path)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path)
    expected = logits(packed)
    model = get_peft_model(packed, lora(init_lora_weights=True))  # B = 0: the adapter adds nothing
    with hf_lotion.requantizing_merge():
        merged = model.merge_and_unload()
    assert torch.equal(logits(merged), expected)
