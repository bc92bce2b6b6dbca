"""`LotionTrainer`: a `transformers.Trainer` with QAT logging, latent evaluation and LOTION's curvature in checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_pt_utils import find_batch_size

from hf_lotion.config import LotionConfig
from hf_lotion.nn import PenaltyRuntime, latent_weights, lotion_layers, penalty_runtime

from .diagnostics import grid_fraction

logger = logging.getLogger(__name__)

CURVATURE_FILE = "lotion_curvature.safetensors"


def lotion_config_of(model: nn.Module) -> LotionConfig | None:
    """The `LotionConfig` a model was quantized with (from its quantizer or `config.quantization_config`)."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, Mapping) and config.get("quant_method") == "lotion":
        config = LotionConfig.from_dict(dict(config))
    return config if isinstance(config, LotionConfig) else None


class LotionTrainer(Trainer):
    """`transformers.Trainer` for models quantized with `LotionConfig`; `TrainingArguments` stay standard.

    Every method trains correctly under plain `Trainer` too (the QAT lives in the model's layers and loss);
    this subclass adds what makes a QAT run legible and resumable:

    * logs `lotion_penalty` (LOTION's penalty value, mean per backward pass) and `grid_fraction` (the share
      of weights within 0.1 of a grid step from a grid point);
    * `evaluate()` reports `eval_loss` of the quantized model (the RTN weights `hf_lotion.convert` packs),
      `eval_latent_loss` of the unquantized latent weights and their gap;
    * checkpoints carry LOTION's curvature state (`lotion_curvature.safetensors`), so
      `resume_from_checkpoint` continues exactly; learned scales get no weight decay.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LotionConfig(bits=4))  # doctest: +SKIP
        >>> trainer = LotionTrainer(model=model, args=TrainingArguments("out"), train_dataset=train)  # doctest: +SKIP
        >>> trainer.train(); trainer.evaluate()["eval_loss"]  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module | None = None, args: Any = None, *pargs: Any, **kwargs: Any) -> None:
        config = _check_model(model)
        if args is not None:
            _check_args(args, config)
        super().__init__(model, args, *pargs, **kwargs)
        # What the accelerator enabled, not only what TrainingArguments say: `accelerate launch` with a
        # DeepSpeed or FSDP config turns them on while args.deepspeed and args.fsdp stay unset.
        _check_sharding(config, deepspeed=self.is_deepspeed_enabled, fsdp=self.is_fsdp_enabled)
        if self.args.n_gpu > 1 and config is not None and config.build_method().penalty() is not None:
            raise ValueError(
                f"LotionTrainer with method={config.method!r} sees {self.args.n_gpu} GPUs in one process, where "
                "Trainer uses nn.DataParallel, whose replicas share one penalty state. Launch one process per "
                "GPU (torchrun --nproc_per_node N, or accelerate launch) for DDP, or set CUDA_VISIBLE_DEVICES "
                "to one GPU."
            )
        self.lotion_config = config

    @property
    def penalty_runtime(self) -> PenaltyRuntime | None:
        """The model's penalty state (LOTION's curvature), or None for methods without a penalty."""
        return penalty_runtime(self.model)

    # -- training ---------------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # Weight decay would pull learned quantization scales (a layer's, or a QAT adapter's
        # `lora_weight_scale.<adapter>`) toward zero.
        return [name for name in super().get_decay_parameter_names(model) if "weight_scale" not in name]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            runtime = self.penalty_runtime
            penalty = runtime.pop_penalty() if runtime is not None else None
            if penalty is not None:
                logs["lotion_penalty"] = round(penalty, 6)
            logs["grid_fraction"] = round(grid_fraction(self.model), 4)
        super().log(logs, start_time)

    # -- evaluation -------------------------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """`Trainer.evaluate` (the quantized model), plus `{prefix}_latent_loss` of the latent weights on the
        same data and `{prefix}_quantization_gap`, logged and returned with the other metrics."""
        previous, self._latent_eval_prefix = getattr(self, "_latent_eval_prefix", None), metric_key_prefix
        try:  # with several eval datasets Trainer calls evaluate() again per dataset, each its own prefix
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._latent_eval_prefix = previous

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        quantized_key = f"{metric_key_prefix}_loss"
        # Only for evaluate() (not predict()); after super(), which moved, cast and wrapped the model.
        if (
            getattr(self, "_latent_eval_prefix", None) != metric_key_prefix
            or quantized_key not in output.metrics
        ):
            return output
        latent_loss = self._latent_eval_loss(dataloader, ignore_keys)
        if latent_loss is not None:
            output.metrics[f"{metric_key_prefix}_latent_loss"] = latent_loss
            output.metrics[f"{metric_key_prefix}_quantization_gap"] = (
                output.metrics[quantized_key] - latent_loss
            )
        return output

    def _latent_eval_loss(self, dataloader, ignore_keys: list[str] | None) -> float | None:
        """Mean loss of the unquantized latent weights, averaged per example as `evaluation_loop` does
        (non-finite losses filtered under `logging_nan_inf_filter`). Its own progress bar, no callbacks:
        callbacks see one evaluation."""
        model = self._wrap_model(self.model, training=False, dataloader=dataloader)
        model.eval()
        losses = []
        bar = tqdm(
            dataloader,
            desc="Latent evaluation",
            leave=False,
            disable=self.args.disable_tqdm or not self.is_local_process_zero(),
        )
        with latent_weights(self.model):
            for inputs in bar:
                loss, _, _ = self.prediction_step(model, inputs, True, ignore_keys=ignore_keys)
                if loss is None:
                    return None
                repeated = loss.detach().float().reshape(1).repeat(find_batch_size(inputs) or 1)
                losses.append(self.accelerator.gather_for_metrics(repeated).cpu())
        if not losses:
            return None
        losses = torch.cat(losses)
        finite = torch.isfinite(losses)
        if self.args.logging_nan_inf_filter and finite.any():
            losses = losses[finite]
        return losses.mean().item()

    # -- publishing -------------------------------------------------------------------------------------

    def card_facts(self) -> Any:
        """What the run knows for the model card: the loss history, steps, tokens, learning rate, data."""
        from hf_lotion.cards.card import CardFacts

        training = {"steps": self.state.global_step, "learning_rate": self.args.learning_rate}
        if self.state.num_input_tokens_seen:
            training["tokens"] = int(self.state.num_input_tokens_seen)
        info = getattr(self.train_dataset, "info", None)  # a `datasets.Dataset` knows its name
        data = getattr(info, "dataset_name", None) or getattr(info, "description", None)
        if data:
            training["data"] = str(data)
        evals = [entry["eval_loss"] for entry in self.state.log_history if "eval_loss" in entry]
        results = {"this_model": evals[-1], "metric": "eval loss"} if evals else None
        config = self.lotion_config  # the latent config: a packed one keeps only the method's name
        options = config.method_options() if config is not None else None
        return CardFacts(
            training=training,
            results=results,
            log_history=list(self.state.log_history),
            method_options=options or None,
        )

    def push_to_hub(
        self,
        commit_message: str | None = None,
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        *,
        repo_id: str | None = None,
        card_facts: Any = None,
        allow_latent: bool = False,
        **kwargs: Any,
    ) -> str:
        """Publish the converted model, its tokenizer, card and plots in one commit (`hf_lotion.push_to_hub`).

        Call `hf_lotion.convert(trainer.model)` first: a model still in the latent format is refused unless
        `allow_latent=True`. `repo_id` defaults to `args.hub_model_id`, then the output folder's name; the
        token to `args.hub_token`, then HF_TOKEN or `hf auth login`. `card_facts` (a `CardFacts`) adds what the
        run cannot know (base model, full-precision and RTN results); the loss history, steps and learning
        rate come from the run. Returns the commit URL.

        Example:
            >>> hf_lotion.convert(trainer.model)  # doctest: +SKIP
            >>> trainer.push_to_hub(repo_id="me/tiny-4bit")  # doctest: +SKIP
        """
        from hf_lotion.cards.push import push_to_hub

        if kwargs:
            raise ValueError(
                f"LotionTrainer.push_to_hub got unsupported arguments {sorted(kwargs)}; allowed: commit_message, "
                "token, revision, private, repo_id, card_facts, allow_latent."
            )
        facts = self.card_facts()
        if card_facts is not None:  # what the caller knows, over what the run knows (a copy: theirs is kept)
            given = {
                field.name: getattr(card_facts, field.name)
                for field in dataclasses.fields(card_facts)
                if getattr(card_facts, field.name) not in (None, [], {})
            }
            facts = dataclasses.replace(facts, **given)
        tokenizer = self.processing_class
        return push_to_hub(
            self.model,
            repo_id or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir)),
            tokenizer=tokenizer if callable(getattr(tokenizer, "save_pretrained", None)) else None,
            card_facts=facts,
            private=private if private is not None else self.args.hub_private_repo,
            revision=revision or self.args.hub_revision,
            commit_message=commit_message,
            token=token or self.args.hub_token,
            allow_latent=allow_latent,
        )

    # -- checkpoints ------------------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        runtime = self.penalty_runtime
        if runtime is not None and self.args.should_save:
            save_curvature_state(runtime, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        runtime = self.penalty_runtime
        if checkpoint is None or runtime is None:
            return
        if os.path.isfile(os.path.join(checkpoint, CURVATURE_FILE)):
            load_curvature_state(runtime, self.model, checkpoint)
        else:
            logger.warning(
                "Checkpoint %s has no %s; LOTION's curvature estimate restarts from zero.",
                checkpoint,
                CURVATURE_FILE,
            )


# Written into the curvature file: the estimate it holds. Files without it (hf-lotion 0.1) held another
# estimate, on another scale, and are not loaded.
CURVATURE_ESTIMATE = "per_token_fisher"


def save_curvature_state(runtime: PenaltyRuntime, directory: str) -> None:
    """Write the penalty's curvature state as safetensors (temporary name, then rename)."""
    state = runtime.state_dict()
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state["ema"].items()}
    metadata = {
        "estimate": CURVATURE_ESTIMATE,
        "updates": str(state["updates"]),
        "steps": str(state["step"]),
        "layer_updates": json.dumps(state["layer_updates"], sort_keys=True),
    }
    path = os.path.join(directory, CURVATURE_FILE)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_curvature_state(runtime: PenaltyRuntime, model: nn.Module, directory: str) -> None:
    """Restore what `save_curvature_state` wrote, onto the devices of the model's layers."""
    path = os.path.join(directory, CURVATURE_FILE)
    layers = {
        layer.penalty_name: layer for _, layer in lotion_layers(model) if layer.penalty_runtime is runtime
    }
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("estimate") != CURVATURE_ESTIMATE:
            logger.warning(
                "%s holds a curvature estimate of an earlier hf-lotion (%s), on another scale; LOTION's "
                "curvature restarts from zero.",
                path,
                metadata.get("estimator", "unknown"),
            )
            return
        names = list(handle.keys())
        unknown = sorted(set(names) - set(layers))
        if unknown:
            raise ValueError(
                f"{path} holds curvature for layers this model does not train with LOTION: {unknown[:3]}... "
                "Resume with the model the checkpoint was trained with."
            )
        tensors = {name: handle.get_tensor(name).to(layers[name].weight.device) for name in names}
    runtime.load_state_dict(
        {
            "step": int(metadata["steps"]),
            "updates": int(metadata["updates"]),
            "ema": tensors,
            "layer_updates": json.loads(metadata["layer_updates"]),
        }
    )
    logger.info("Restored LOTION curvature state (%s) from %s", json.dumps(metadata), path)


def _check_model(model: nn.Module | None):
    """Refuse, before anything is built, models LotionTrainer cannot train correctly."""
    if model is None:
        raise ValueError(
            "LotionTrainer needs `model` (a model quantized with LotionConfig); model_init is not supported."
        )
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            "LotionTrainer got a torch.compile'd model: its parameter names gain an `_orig_mod.` prefix, so "
            "checkpoints and curvature state would not reload. Pass the uncompiled model and set "
            "`TrainingArguments(torch_compile=True)` instead."
        )
    config = lotion_config_of(model)
    if config is not None:
        config.post_init()  # re-validate: the config may have been edited after loading
        _refresh_penalty(model, config)
    if config is not None and config.format == "packed":
        raise ValueError(
            "LotionTrainer got a packed model (LotionConfig.format='packed'), which holds integers and cannot "
            "be trained. Train the latent model and call hf_lotion.convert(model) afterwards; to train LoRA "
            "adapters over a packed base (QLoRA-style), use transformers.Trainer."
        )
    if not lotion_layers(model):
        raise ValueError(
            f"LotionTrainer got a {type(model).__name__} with no LOTION layers. Load it with "
            "`from_pretrained(..., quantization_config=LotionConfig(...))` or call `hf_lotion.prepare(model, "
            "config)` first; for full-precision training use transformers.Trainer."
        )
    return config


def _refresh_penalty(model: nn.Module, config: LotionConfig) -> None:
    """Apply edits of the method's options made after loading (the curvature state is kept)."""
    from hf_lotion.quantizer import install_lotion_penalty

    method = config.build_method()
    layers = [layer for _, layer in lotion_layers(model)]
    if any(layer.method.name != method.name for layer in layers):
        raise ValueError(
            f"LotionConfig.method={method.name!r} differs from the method the model's layers were built with "
            f"({layers[0].method.name!r}); to switch methods reload with "
            "`from_pretrained(path, quantization_config=LotionConfig(..., method=...))`."
        )
    for layer in layers:
        layer.method = method
    runtime, penalty = penalty_runtime(model), method.penalty()
    if runtime is not None and penalty is not None:
        runtime.penalty = penalty
    elif (runtime is None) != (penalty is None) and config.format == "latent":
        install_lotion_penalty(model, config)


def _check_args(args: Any, config) -> None:
    if getattr(args, "push_to_hub", False):
        raise ValueError(
            "LotionTrainer does not support TrainingArguments.push_to_hub=True: Trainer would push the latent "
            "(training) checkpoints as they are saved. Allowed: push_to_hub=False; after training call "
            "hf_lotion.convert(trainer.model) and trainer.push_to_hub(repo_id=...), which publishes the packed "
            "model with its card in one commit."
        )
    _check_sharding(
        config, deepspeed=bool(getattr(args, "deepspeed", None)), fsdp=bool(getattr(args, "fsdp", None))
    )


def _check_sharding(config, deepspeed: bool, fsdp: bool) -> None:
    """Refuse DeepSpeed and FSDP for methods with a penalty (LOTION), which have not been run sharded.

    The quantization itself is not what breaks: FSDP2 shards dim 0 and gathers whole weights for the
    forward, so every group is complete. What is untested is LOTION's step bookkeeping: its curvature is kept
    per whole weight on every rank, and a step window closes on `torch.optim.Optimizer.step`, which
    DeepSpeed's engine does not call; ZeRO-3 also swaps parameters' storage in and out. STE and StableQAT
    live entirely in the layers' autograd and are not refused.
    """
    if config is None or config.build_method().penalty() is None:
        return
    for name, enabled in (("DeepSpeed", deepspeed), ("FSDP", fsdp)):
        if enabled:
            raise ValueError(
                f"LotionTrainer with method={config.method!r} does not support {name} (enabled through "
                "TrainingArguments or an accelerate config): LOTION's curvature state and step windows have "
                "not been tested with sharded parameters or optimizers. Use DDP (torchrun or accelerate "
                "launch without DeepSpeed/FSDP), or method='ste'/'stableqat'."
            )
