"""LotionTrainer: logging, quantized and latent evaluation, learned scales, curvature in checkpoints, resume, bad input.

That every method trains correctly in every loop (plain Trainer included) is tested in test_lotion_in_graph.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import VOCAB, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_lotion
from hf_lotion import LotionConfig, LotionTrainer
from hf_lotion.trainer.recipes import CausalLMBlocks
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


class CountEvaluationCallbacks(TrainerCallback):
    def __init__(self) -> None:
        self.prediction_steps = self.evaluations = 0

    def on_prediction_step(self, args, state, control, **kwargs):
        self.prediction_steps += 1

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations += 1


def test_latent_evaluation_per_dataset_in_low_precision_and_not_in_predict(tmp_path):
    """Several eval datasets each get their latent loss; bf16_full_eval evaluates both passes in bf16;
    callbacks (progress bars) see one pass per dataset; predict() adds nothing."""
    model = lotion_model()
    evals = {"a": random_blocks(8, 21), "b": random_blocks(4, 22)}
    counter = CountEvaluationCallbacks()
    args = training_args(tmp_path, bf16_full_eval=True, per_device_eval_batch_size=4)
    trainer = LotionTrainer(model=model, args=args, eval_dataset=evals, callbacks=[counter])
    metrics = trainer.evaluate()
    assert counter.prediction_steps == 2 + 1 and counter.evaluations == 2  # batches of 4; one per dataset
    assert next(model.parameters()).dtype == torch.bfloat16
    model.eval()
    for name, dataset in evals.items():
        losses = {}
        with torch.no_grad():
            for start in range(0, len(dataset.blocks), 4):
                batch = {
                    "input_ids": dataset.blocks[start : start + 4],
                    "labels": dataset.blocks[start : start + 4],
                }
                losses.setdefault("quantized", []).append(model(**batch).loss.float().item())
                with hf_lotion.latent_weights(model):
                    losses.setdefault("latent", []).append(model(**batch).loss.float().item())
        quantized, latent = (sum(v) / len(v) for v in (losses["quantized"], losses["latent"]))
        assert metrics[f"eval_{name}_loss"] == pytest.approx(quantized, rel=1e-6)
        assert metrics[f"eval_{name}_latent_loss"] == pytest.approx(latent, rel=1e-6)
        assert metrics[f"eval_{name}_quantization_gap"] == pytest.approx(quantized - latent, abs=1e-6)
    prediction = trainer.predict(evals["a"])
    assert "test_loss" in prediction.metrics and not any("latent" in key for key in prediction.metrics)


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


def test_trainer_folds_the_curvature_once_per_optimizer_step(tmp_path):
    trainer = LotionTrainer(
        model=lotion_model(),
        args=training_args(
            tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=3
        ),
        train_dataset=random_blocks(32, 7),
    )
    trainer.train()
    runtime = trainer.penalty_runtime
    assert (runtime.step, runtime.updates) == (2, 1)  # curvature_every=4: estimated at step 0 only


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
    assert trainer.penalty_runtime.step == 4  # the optimizer hook also fires for bitsandbytes' optimizers


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
    [("lotion", {}), ("lotion", {"curvature_every": 2}), ("stableqat", {})],
    ids=["lotion", "lotion-curvature-every-2", "stableqat"],
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
        full_state = full_trainer.penalty_runtime.state_dict()
        resumed_state = resumed_trainer.penalty_runtime.state_dict()
        assert full_state["step"] == resumed_state["step"] == 6
        assert full_state["updates"] == resumed_state["updates"] == (2 if not overrides else 3)
        for name, ema in full_state["ema"].items():
            assert torch.equal(ema, resumed_state["ema"][name]), name


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
    evals = random_blocks(8, 16)
    runs = {}
    for compiled in (True, False):
        model = lotion_model(method=method)
        overrides = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        # SGD: Adam's normalisation would blow float rounding in near-zero gradients up to learning-rate size.
        args = training_args(tmp_path / str(compiled), max_steps=2, optim="sgd", **overrides)
        trainer = LotionTrainer(
            model=model, args=args, train_dataset=random_blocks(32, 17), eval_dataset=evals
        )
        trainer.train()
        runs[compiled] = (model, trainer, trainer.evaluate())
    model, trainer, metrics = runs[True]
    eager_model, eager_trainer, _ = runs[False]
    for (name, p), (_, q) in zip(model.named_parameters(), eager_model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)  # the penalty too, when compiled
    if method == "lotion":
        assert trainer.penalty_runtime.updates == eager_trainer.penalty_runtime.updates == 1
    model.eval()
    with torch.no_grad():
        quantized = model(**batch_of(evals, 8)).loss.item()
        with hf_lotion.latent_weights(model):
            latent = model(**batch_of(evals, 8)).loss.item()
    assert metrics["eval_loss"] == pytest.approx(quantized, rel=1e-5)
    assert metrics["eval_latent_loss"] == pytest.approx(latent, rel=1e-5)


@pytest.mark.parametrize("plugin", ["deepspeed_plugin", "fsdp_plugin"])
@pytest.mark.parametrize("method", ["lotion", "ste"])
def test_sharding_enabled_by_an_accelerate_config_is_refused_for_lotion(
    tmp_path, monkeypatch, plugin, method
):
    """`accelerate launch` with a DeepSpeed/FSDP config enables it in the accelerator's state while
    `args.deepspeed` and `args.fsdp` stay unset: the refusal must follow what the accelerator enabled."""
    original = Trainer.create_accelerator_and_postprocess

    def with_plugin(self):
        original(self)
        # What Trainer derives from the accelerator's state after `accelerate launch --config_file ...`.
        self.is_deepspeed_enabled = plugin == "deepspeed_plugin"
        self.is_fsdp_enabled = plugin == "fsdp_plugin"

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_plugin)
    args = training_args(tmp_path)
    assert not args.deepspeed and not args.fsdp
    name = "DeepSpeed" if plugin == "deepspeed_plugin" else "FSDP"
    if method == "lotion":
        with pytest.raises(
            ValueError, match=rf"does not support {name} \(enabled through TrainingArguments or an accelerate"
        ):
            LotionTrainer(model=lotion_model(method=method), args=args)
    else:  # STE has no penalty state: nothing to refuse
        LotionTrainer(model=lotion_model(method=method), args=args)


def test_several_gpus_in_one_process_are_refused_for_lotion(tmp_path, monkeypatch):
    """Trainer wraps the model in nn.DataParallel when one process sees several GPUs."""
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"sees 2 GPUs in one process.*torchrun --nproc_per_node"):
        LotionTrainer(model=lotion_model(), args=training_args(tmp_path))


def test_trainer_refuses_a_packed_model(tmp_path):
    model = hf_lotion.convert(lotion_model())
    with pytest.raises(ValueError, match=r"packed model .* cannot be trained"):
        LotionTrainer(model=model, args=training_args(tmp_path))


def test_trainer_refuses_nonsense_curvature_settings_at_construction(tmp_path):
    model = lotion_model()
    model.hf_quantizer.quantization_config.curvature = "hessian"
    with pytest.raises(ValueError, match=r"LotionConfig\.curvature='hessian' .* \('fisher',\)"):
        LotionTrainer(model=model, args=training_args(tmp_path))
    model.hf_quantizer.quantization_config.curvature = "fisher"
    model.hf_quantizer.quantization_config.curvature_every = 0
    with pytest.raises(ValueError, match=r"LotionConfig\.curvature_every=0"):
        LotionTrainer(model=model, args=training_args(tmp_path))


def test_trainer_applies_penalty_options_edited_after_loading(tmp_path):
    model = lotion_model()
    model.hf_quantizer.quantization_config.lotion_lambda = 4.0
    trainer = LotionTrainer(model=model, args=training_args(tmp_path))
    assert trainer.penalty_runtime.penalty.strength == 4.0
    model.hf_quantizer.quantization_config.lotion_lambda = 0.0
    LotionTrainer(model=model, args=training_args(tmp_path))
    assert hf_lotion.penalty_runtime(model) is None
    model.hf_quantizer.quantization_config.lotion_lambda = 2.0  # and on again: the layers use it
    trainer = LotionTrainer(model=model, args=training_args(tmp_path), train_dataset=random_blocks(32, 3))
    trainer.train()
    assert trainer.penalty_runtime.penalty.strength == 2.0 and trainer.penalty_runtime.updates > 0
    assert all(layer.method.lotion_lambda == 2.0 for _, layer in hf_lotion.lotion_layers(model))
    model.hf_quantizer.quantization_config.method = "ste"
    with pytest.raises(ValueError, match=r"method='ste' differs from the method .* \('lotion'\); to switch"):
        LotionTrainer(model=model, args=training_args(tmp_path))


def test_resume_from_a_curvature_file_of_an_earlier_version_restarts_it(tmp_path, caplog):
    args = training_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    LotionTrainer(model=lotion_model(), args=args, train_dataset=random_blocks(32, 10)).train()
    path = tmp_path / "checkpoint-3" / CURVATURE_FILE
    tensors = load_file(path)  # as 0.1 wrote it: another estimate, no "estimate" tag
    save_file(tensors, path, metadata={"estimator": "fisher", "beta": "0.99", "updates": "3", "steps": "3"})
    trainer = LotionTrainer(
        model=lotion_model(), args=training_args(tmp_path, max_steps=4), train_dataset=random_blocks(32, 10)
    )
    with caplog.at_level("WARNING", logger="hf_lotion.trainer.trainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert "curvature estimate of an earlier hf-lotion (fisher)" in caplog.text
    # Restarted: the one step trained after resuming is the runtime's first (restored, it would be the 4th).
    assert (trainer.penalty_runtime.step, trainer.penalty_runtime.updates) == (1, 1)


def test_trainer_refuses_model_init(tmp_path):
    with pytest.raises(ValueError, match="needs `model`"):
        LotionTrainer(args=training_args(tmp_path), model_init=lambda: lotion_model())
