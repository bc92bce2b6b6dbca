"""LotionTrainer and LotionRegularizer: curvature, regulariser gradient, evaluation, resume, bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import VOCAB, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_lotion
from hf_lotion import LotionConfig, LotionRegularizer, LotionTrainer
from hf_lotion.quant.lotion import lotion_penalty_grad
from hf_lotion.trainer import FisherCurvature, GaussNewtonCurvature, grid_fraction
from hf_lotion.trainer.curvature import sampled_label_gradients
from hf_lotion.trainer.recipes import CausalLMBlocks
from hf_lotion.trainer.regularizer import count_target_tokens
from hf_lotion.trainer.trainer import CURVATURE_FILE

hf_logging.set_verbosity_error()

SEQ = 16


def random_blocks(n: int, seed: int) -> CausalLMBlocks:
    return CausalLMBlocks(torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed)))


def lotion_model(method: str = "lotion", seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    return hf_lotion.prepare(
        model, LotionConfig(bits=config.pop("bits", 2), group_size=32, method=method, **config)
    )


def training_args(out, **overrides) -> TrainingArguments:
    defaults = dict(
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    return TrainingArguments(str(out), **(defaults | overrides))


def batch_of(dataset: CausalLMBlocks, n: int = 4) -> dict[str, torch.Tensor]:
    ids = dataset.blocks[:n]
    return {"input_ids": ids, "labels": ids}


def quantized_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# -- curvature estimators ----------------------------------------------------------------------------


def test_fisher_curvature_is_bias_corrected_ema_of_n_times_squared_gradient():
    estimator = FisherCurvature(beta=0.9)
    g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    estimator.observe({"w": g1}, num_tokens=10)
    assert torch.allclose(estimator.estimate("w"), 10 * g1**2)  # first estimate is not shrunk
    estimator.observe({"w": g2}, num_tokens=10)
    ema = 0.9 * 0.1 * 10 * g1**2 + 0.1 * 10 * g2**2
    assert torch.allclose(estimator.estimate("w"), ema / (1 - 0.9**2))


def test_fisher_curvature_undoes_the_fp16_loss_scale():
    plain, scaled = FisherCurvature(0.5), FisherCurvature(0.5)
    grad = torch.tensor([0.25, -1.0])
    plain.observe({"w": grad}, num_tokens=8)
    scaled.observe({"w": grad * 1024.0}, num_tokens=8, grad_scale=1024.0)
    assert torch.equal(plain.estimate("w"), scaled.estimate("w"))


def test_curvature_state_refuses_another_estimator():
    fisher = FisherCurvature(0.9)
    fisher.observe({"w": torch.ones(2)}, 1)
    with pytest.raises(ValueError, match=r"estimator 'fisher'.*uses 'gauss_newton'.*curvature='fisher'"):
        GaussNewtonCurvature(0.9, every=2).load_state_dict(fisher.state_dict())


def test_sampled_label_gradients_are_seeded_and_leave_grad_untouched():
    model = lotion_model()
    batch = batch_of(random_blocks(4, 0))
    weights = [layer.weight for _, layer in hf_lotion.lotion_layers(model)]
    first, n = sampled_label_gradients(model, weights, batch, torch.Generator().manual_seed(3))
    again, _ = sampled_label_gradients(model, weights, batch, torch.Generator().manual_seed(3))
    other, _ = sampled_label_gradients(model, weights, batch, torch.Generator().manual_seed(4))
    assert n == 4 * (SEQ - 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(w.grad is None for w in weights)


def test_count_target_tokens_skips_ignored_and_first_position():
    labels = torch.tensor([[5, 6, -100, 7], [1, -100, -100, 2]])
    assert count_target_tokens({"labels": labels}) == 2 + 1
    assert count_target_tokens({"attention_mask": torch.tensor([[1, 1, 1, 0]])}) == 2
    assert count_target_tokens({"input_ids": torch.zeros(2, 5)}) == 8
    with pytest.raises(ValueError, match="no `labels`, `attention_mask` or `input_ids`"):
        count_target_tokens({})


# -- the regulariser ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"{b}bit")
def test_regularizer_adds_lambda_half_curvature_times_slope_to_loss_gradient(bits):
    model = lotion_model(bits=bits, lotion_lambda=0.5)
    batch = batch_of(random_blocks(4, 1))
    model(**batch).loss.backward()
    loss_grads = {name: layer.weight.grad.clone() for name, layer in hf_lotion.lotion_layers(model)}
    regularizer = LotionRegularizer(model)
    value = regularizer.step(batch)
    n = count_target_tokens(batch)
    assert value is not None and value.item() > 0
    for name, layer in hf_lotion.lotion_layers(model):
        curvature = n * loss_grads[name].float() ** 2  # first step: bias correction makes the EMA exact
        spec = layer.spec
        expected = loss_grads[name] + lotion_penalty_grad(
            layer.weight, layer.quant_scales(), curvature, spec.bits, spec.group_size, 0.5
        )
        torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-6, atol=1e-9)


def test_regularizer_pulls_weights_toward_the_grid():
    # With no loss gradient beyond the penalty, SGD on it must raise the share of weights near the grid.
    model = lotion_model(bits=2, lotion_lambda=1.0)
    regularizer = LotionRegularizer(model)
    for name, layer in hf_lotion.lotion_layers(model):
        regularizer.estimator.ema[name] = torch.ones_like(layer.weight)
    regularizer.estimator.updates = 10**6
    regularizer.estimator.observe = lambda *a, **k: None  # keep G fixed at 1
    before = grid_fraction(model)
    for _ in range(50):
        for _, layer in hf_lotion.lotion_layers(model):
            layer.weight.grad = torch.zeros_like(layer.weight)
        regularizer.step(num_tokens=1)
        with torch.no_grad():
            for _, layer in hf_lotion.lotion_layers(model):
                layer.weight -= 2.0 * layer.weight.grad
    assert grid_fraction(model) > before + 0.2


@pytest.mark.parametrize("method", ["ste", "stableqat", "rtn"])
def test_regularizer_is_a_no_op_for_other_methods(method):
    model = lotion_model(method=method)
    batch = batch_of(random_blocks(4, 2))
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    regularizer = LotionRegularizer(model)
    assert not regularizer.active and regularizer.step(batch) is None
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)


def test_gauss_newton_regularizer_samples_every_k_steps():
    model = lotion_model(curvature="gauss_newton", curvature_every=3)
    regularizer = LotionRegularizer(model)
    batch = batch_of(random_blocks(4, 3))
    for _ in range(7):
        model.zero_grad()
        model(**batch).loss.backward()
        regularizer.step(batch)
    assert regularizer.estimator.updates == 3  # steps 0, 3, 6


def test_regularizer_refuses_models_without_lotion_layers_and_edited_configs():
    with pytest.raises(ValueError, match=r"has no LotionLinear layers.*prepare"):
        LotionRegularizer(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = lotion_model()
    model.hf_quantizer.quantization_config.curvature_beta = 1.5
    with pytest.raises(ValueError, match=r"LotionConfig\.curvature_beta=1\.5 .* \[0, 1\)"):
        LotionRegularizer(model)


# -- LotionTrainer ------------------------------------------------------------------------------------


def test_trainer_trains_logs_penalty_and_grid_fraction_and_evaluates_quantized(tmp_path):
    model = lotion_model()
    train, evals = random_blocks(32, 4), random_blocks(8, 5)
    trainer = LotionTrainer(
        model=model, args=training_args(tmp_path), train_dataset=train, eval_dataset=evals
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(entry["lotion_penalty"] > 0 and 0 <= entry["grid_fraction"] <= 1 for entry in logs)
    metrics = trainer.evaluate()
    model.eval()
    batch = batch_of(evals, 8)
    with torch.no_grad():
        quantized = model(**batch).loss.item()
        with hf_lotion.latent_weights(model):
            latent = model(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(quantized, rel=1e-5)
    assert metrics["eval_latent_loss"] == pytest.approx(latent, rel=1e-5)
    assert metrics["eval_quantization_gap"] == pytest.approx(quantized - latent, abs=1e-5)
    assert quantized != latent


def test_periodic_evaluation_during_training_logs_quantized_and_latent_loss(tmp_path):
    args = training_args(
        tmp_path, eval_strategy="steps", eval_steps=2, lr_scheduler_type="cosine", warmup_steps=1
    )
    trainer = LotionTrainer(
        model=lotion_model(),
        args=args,
        train_dataset=random_blocks(32, 14),
        eval_dataset=random_blocks(8, 15),
    )
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(entry["eval_latent_loss"] > 0 and "eval_quantization_gap" in entry for entry in evals)


@pytest.mark.parametrize("method", ["lotion", "ste", "stableqat"])
def test_trainer_changes_weights_and_trains_learned_scales(tmp_path, method):
    model = lotion_model(method=method)
    before = quantized_weights(model)
    trainer = LotionTrainer(
        model=model, args=training_args(tmp_path, weight_decay=0.1), train_dataset=random_blocks(32, 6)
    )
    trainer.train()
    after = quantized_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if n.endswith("proj.weight"))
    scales = [n for n in before if n.endswith("weight_scale")]
    assert bool(scales) == (method == "stableqat")
    assert all(not torch.equal(before[n], after[n]) for n in scales)
    decayed = set(trainer.get_decay_parameter_names(model))
    assert not any(n.endswith("weight_scale") for n in decayed)


def test_trainer_counts_tokens_over_the_whole_accumulation_window(tmp_path):
    model = lotion_model()
    seen = []
    trainer = LotionTrainer(
        model=model,
        args=training_args(
            tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=3
        ),
        train_dataset=random_blocks(32, 7),
    )
    step = trainer.lotion_regularizer.step

    def recording_step(batch=None, num_tokens=None, grad_scale=1.0):
        seen.append(num_tokens)
        return step(batch, num_tokens=num_tokens, grad_scale=grad_scale)

    trainer.lotion_regularizer.step = recording_step
    trainer.train()
    assert seen == [3 * 2 * (SEQ - 1)] * 2


def test_trainer_runs_with_bf16_autocast_and_bnb_8bit_adam(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = lotion_model(bits=4)
    args = training_args(tmp_path, bf16=True, optim="adamw_bnb_8bit", max_grad_norm=0.5)
    trainer = LotionTrainer(model=model, args=args, train_dataset=random_blocks(32, 8))
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer).__module__.startswith("bitsandbytes")
    assert any(
        state.get("state1") is not None and state["state1"].dtype == torch.uint8
        for state in optimizer.state.values()
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.lotion_regularizer.steps == 4


class InterruptAt(TrainerCallback):
    """Stops training after `step`, as a crash after a checkpoint would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("lotion", {}),
        ("lotion", {"curvature": "gauss_newton", "curvature_every": 2}),
        ("stableqat", {}),
    ],
    ids=["lotion-fisher", "lotion-gauss_newton", "stableqat"],
)
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, method, overrides):
    train = random_blocks(64, 9)

    def run(out, stop_at=None, resume=None):
        model = lotion_model(method=method, **overrides)
        args = training_args(out, max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1)
        callbacks = [InterruptAt(stop_at)] if stop_at else None
        trainer = LotionTrainer(model=model, args=args, train_dataset=train, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, full_trainer = run(tmp_path / "full")
    run(tmp_path / "part", stop_at=3)  # the same 6-step schedule, interrupted after checkpoint-3
    checkpoint = tmp_path / "part" / "checkpoint-3"
    assert not (tmp_path / "part" / "checkpoint-6").exists()
    if method == "lotion":
        assert (checkpoint / CURVATURE_FILE).is_file()
        assert len(load_file(checkpoint / CURVATURE_FILE)) == len(hf_lotion.lotion_layers(full))
    resumed, resumed_trainer = run(tmp_path / "part", 6, resume=str(checkpoint))
    expected, got = quantized_weights(full), quantized_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if method == "lotion":
        full_state = full_trainer.lotion_regularizer.state_dict()
        resumed_state = resumed_trainer.lotion_regularizer.state_dict()
        assert full_state["steps"] == resumed_state["steps"] == 6
        for name, ema in full_state["curvature"]["ema"].items():
            assert torch.equal(ema, resumed_state["curvature"]["ema"][name]), name


def test_resume_without_curvature_file_warns_and_restarts(tmp_path, caplog):
    model = lotion_model()
    args = training_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    LotionTrainer(model=model, args=args, train_dataset=random_blocks(32, 10)).train()
    os.remove(tmp_path / "checkpoint-3" / CURVATURE_FILE)
    args = training_args(tmp_path, max_steps=4)
    trainer = LotionTrainer(model=lotion_model(), args=args, train_dataset=random_blocks(32, 10))
    with caplog.at_level("WARNING", logger="hf_lotion.trainer.trainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert "curvature estimate restarts from zero" in caplog.text


# -- bad input ------------------------------------------------------------------------------------------


def test_trainer_refuses_a_model_without_lotion_layers(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match=r"no LOTION layers.*LotionConfig.*transformers\.Trainer"):
        LotionTrainer(model=model, args=training_args(tmp_path))


def test_trainer_refuses_a_compiled_model(tmp_path):
    model = torch.compile(lotion_model())
    with pytest.raises(ValueError, match=r"torch\.compile'd model.*torch_compile=True"):
        LotionTrainer(model=model, args=training_args(tmp_path))


@pytest.mark.parametrize("method", ["lotion", "stableqat"])
def test_trainer_with_torch_compile_trains_and_evaluates_like_eager(tmp_path, method):
    # aot_eager traces through the QAT layers and autograd functions without needing a C++ compiler.
    model, evals = lotion_model(method=method), random_blocks(8, 16)
    args = training_args(tmp_path, torch_compile=True, torch_compile_backend="aot_eager", max_steps=2)
    trainer = LotionTrainer(model=model, args=args, train_dataset=random_blocks(32, 17), eval_dataset=evals)
    trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        quantized = model(**batch_of(evals, 8)).loss.item()
        with hf_lotion.latent_weights(model):
            latent = model(**batch_of(evals, 8)).loss.item()
    assert metrics["eval_loss"] == pytest.approx(quantized, rel=1e-5)
    assert metrics["eval_latent_loss"] == pytest.approx(latent, rel=1e-5)


def test_trainer_refuses_a_packed_model(tmp_path):
    model = hf_lotion.convert(lotion_model())
    with pytest.raises(ValueError, match=r"packed model .* cannot be trained"):
        LotionTrainer(model=model, args=training_args(tmp_path))


def test_trainer_refuses_nonsense_curvature_settings_at_construction(tmp_path):
    model = lotion_model()
    model.hf_quantizer.quantization_config.curvature = "hessian"
    with pytest.raises(
        ValueError, match=r"LotionConfig\.curvature='hessian' .* \('fisher', 'gauss_newton'\)"
    ):
        LotionTrainer(model=model, args=training_args(tmp_path))
    model.hf_quantizer.quantization_config.curvature = "gauss_newton"
    model.hf_quantizer.quantization_config.curvature_every = 0
    with pytest.raises(ValueError, match=r"LotionConfig\.curvature_every=0"):
        LotionTrainer(model=model, args=training_args(tmp_path))


def test_trainer_refuses_model_init(tmp_path):
    with pytest.raises(ValueError, match="needs `model`"):
        LotionTrainer(args=training_args(tmp_path), model_init=lambda: lotion_model())


def test_penalty_value_matches_its_definition():
    model = lotion_model(lotion_lambda=2.0)
    batch = batch_of(random_blocks(4, 11))
    model(**batch).loss.backward()
    grads = {name: layer.weight.grad.clone() for name, layer in hf_lotion.lotion_layers(model)}
    value = LotionRegularizer(model).step(batch).item()
    n = count_target_tokens(batch)
    expected = 0.0
    for name, layer in hf_lotion.lotion_layers(model):
        sigma2 = hf_lotion.quant.rounding_variance(
            layer.weight, layer.quant_scales(), layer.spec.bits, layer.spec.group_size
        )
        expected += (0.5 * 2.0 * n * grads[name] ** 2 * sigma2).sum().item()
    assert math.isclose(value, expected, rel_tol=1e-5)


def test_regularizer_with_fp16_loss_scale_matches_the_unscaled_step():
    batch = batch_of(random_blocks(4, 12))
    plain, scaled = lotion_model(seed=3), lotion_model(seed=3)
    plain(**batch).loss.backward()
    (scaled(**batch).loss * 1024.0).backward()
    LotionRegularizer(plain).step(batch)
    LotionRegularizer(scaled).step(batch, grad_scale=1024.0)
    for (name, a), (_, b) in zip(
        hf_lotion.lotion_layers(plain), hf_lotion.lotion_layers(scaled), strict=True
    ):
        torch.testing.assert_close(b.weight.grad / 1024.0, a.weight.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_regularizer_skips_the_curvature_update_when_fp16_gradients_overflow():
    model = lotion_model()
    batch = batch_of(random_blocks(4, 13))
    model(**batch).loss.backward()
    _, layer = hf_lotion.lotion_layers(model)[0]
    layer.weight.grad[0, 0] = float("inf")
    regularizer = LotionRegularizer(model)
    regularizer.step(batch, grad_scale=65536.0)
    assert regularizer.estimator.updates == 0
