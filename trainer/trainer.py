"""`LotionTrainer`: a `transformers.Trainer` that trains a LOTION model quantization-aware."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer

from hf_lotion.nn import latent_weights, lotion_layers

from .diagnostics import grid_fraction
from .regularizer import LotionRegularizer, count_target_tokens, lotion_config_of

logger = logging.getLogger(__name__)

CURVATURE_FILE = "lotion_curvature.safetensors"


class LotionTrainer(Trainer):
    """`transformers.Trainer` for models quantized with `LotionConfig`; `TrainingArguments` stay standard.

    Everything method-specific comes from the model's `LotionConfig`:

    * `method="lotion"`: after each optimizer step's backward, the curvature estimate is updated from the
      loss gradient and LOTION's regulariser gradient is added (see `LotionRegularizer`); its value is
      logged as `lotion_penalty`. Checkpoints carry the curvature state, so `resume_from_checkpoint`
      continues exactly.
    * `method="ste"` / `"stableqat"`: the fake-quantized forward and surrogate backward live in the
      layers; learned scales train with the weights (and get no weight decay).
    * `evaluate()` reports `eval_loss` of the quantized model (the RTN weights `hf_lotion.convert` packs)
      and `eval_latent_loss` of the unquantized latent weights; training logs add `grid_fraction`, the
      share of weights within 0.1 of a grid step from a grid point.

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
        self.lotion_config = config
        self.lotion_regularizer = LotionRegularizer(self.model, config, seed=self.args.seed)
        self._lotion_local_tokens = 0
        self._lotion_penalty_sum: torch.Tensor | None = None
        self._lotion_penalty_steps = 0

    # -- training ---------------------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        regularizer = self.lotion_regularizer
        if not regularizer.active:
            return loss
        if num_items_in_batch is None:
            self._lotion_local_tokens += count_target_tokens(inputs)
        if not self.accelerator.sync_gradients:
            return loss
        # Gradients of this optimizer step are complete (and all-reduced under DDP).
        if num_items_in_batch is None:
            num_tokens = self._global_token_count(self._lotion_local_tokens)
        else:
            num_tokens = float(num_items_in_batch)
        self._lotion_local_tokens = 0
        scaler = getattr(self.accelerator, "scaler", None)
        grad_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        batch = self._prepare_inputs(inputs) if regularizer.needs_batch() else None
        penalty = regularizer.step(batch, num_tokens=num_tokens, grad_scale=grad_scale)
        if penalty is not None:
            penalty = penalty.detach()
            self._lotion_penalty_sum = (
                penalty if self._lotion_penalty_sum is None else self._lotion_penalty_sum + penalty
            )
            self._lotion_penalty_steps += 1
        return loss

    def _global_token_count(self, local: int) -> float:
        if self.args.world_size <= 1:
            return float(local)
        count = torch.tensor([local], device=self.args.device, dtype=torch.float64)
        return float(self.accelerator.gather(count).sum())

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # Weight decay would pull learned quantization scales toward zero.
        return [
            name for name in super().get_decay_parameter_names(model) if not name.endswith("weight_scale")
        ]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            if self._lotion_penalty_steps:
                logs["lotion_penalty"] = round(
                    float(self._lotion_penalty_sum) / self._lotion_penalty_steps, 6
                )
                self._lotion_penalty_sum, self._lotion_penalty_steps = None, 0
            logs["grid_fraction"] = round(grid_fraction(self.model), 4)
        super().log(logs, start_time)

    # -- evaluation -------------------------------------------------------------------------------------

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        quantized_key = f"{metric_key_prefix}_loss"
        if description != "Evaluation" or quantized_key not in output.metrics:
            return output
        # The same data through the unquantized latent weights, so the quantization gap is visible.
        latent_prefix = f"{metric_key_prefix}_latent"
        handler = self.callback_handler
        # One evaluate() is one pass for callbacks (progress bars): the latent pass reports no steps.
        handler.on_prediction_step = lambda args, state, control: control
        try:
            with latent_weights(self.model):
                latent = super().evaluation_loop(
                    dataloader, "Latent evaluation", True, ignore_keys, metric_key_prefix=latent_prefix
                )
        finally:
            del handler.on_prediction_step
        latent_loss = latent.metrics.get(f"{latent_prefix}_loss")
        if latent_loss is not None:
            output.metrics[f"{latent_prefix}_loss"] = latent_loss
            output.metrics[f"{metric_key_prefix}_quantization_gap"] = (
                output.metrics[quantized_key] - latent_loss
            )
        return output

    # -- checkpoints ------------------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.lotion_regularizer.active and self.args.should_save:
            save_curvature_state(self.lotion_regularizer, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.lotion_regularizer.active:
            return
        if os.path.isfile(os.path.join(checkpoint, CURVATURE_FILE)):
            load_curvature_state(self.lotion_regularizer, checkpoint)
        else:
            logger.warning(
                "Checkpoint %s has no %s; LOTION's curvature estimate restarts from zero.",
                checkpoint,
                CURVATURE_FILE,
            )


def save_curvature_state(regularizer: LotionRegularizer, directory: str) -> None:
    """Write the regulariser's curvature state as safetensors (temporary name, then rename)."""
    state = regularizer.state_dict()
    curvature = state["curvature"]
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in curvature["ema"].items()}
    metadata = {
        "estimator": curvature["estimator"],
        "beta": repr(curvature["beta"]),
        "updates": str(curvature["updates"]),
        "steps": str(state["steps"]),
    }
    path = os.path.join(directory, CURVATURE_FILE)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_curvature_state(regularizer: LotionRegularizer, directory: str) -> None:
    """Restore what `save_curvature_state` wrote, onto the devices of the regulariser's layers."""
    path = os.path.join(directory, CURVATURE_FILE)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
        names = list(handle.keys())
        unknown = sorted(set(names) - set(regularizer.layers))
        if unknown:
            raise ValueError(
                f"{path} holds curvature for layers this model does not train with LOTION: {unknown[:3]}... "
                "Resume with the model the checkpoint was trained with."
            )
        tensors = {name: handle.get_tensor(name).to(regularizer.layers[name].weight.device) for name in names}
    regularizer.load_state_dict(
        {
            "steps": int(metadata["steps"]),
            "curvature": {
                "estimator": metadata.get("estimator"),
                "beta": float(metadata["beta"]),
                "updates": int(metadata["updates"]),
                "ema": tensors,
            },
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
    if config is not None and config.format == "packed":
        raise ValueError(
            "LotionTrainer got a packed model (LotionConfig.format='packed'), which holds integers and cannot "
            "be trained. Train the latent model and call hf_lotion.convert(model) afterwards."
        )
    if not lotion_layers(model):
        raise ValueError(
            f"LotionTrainer got a {type(model).__name__} with no LOTION layers. Load it with "
            "`from_pretrained(..., quantization_config=LotionConfig(...))` or call `hf_lotion.prepare(model, "
            "config)` first; for full-precision training use transformers.Trainer."
        )
    return config


def _check_args(args: Any, config) -> None:
    method = config.method if config is not None else None
    if method != "lotion":
        return
    if getattr(args, "deepspeed", None):
        raise ValueError(
            "LotionTrainer with method='lotion' does not support DeepSpeed: ZeRO partitions the gradients the "
            "LOTION regulariser is added to. Use DDP (torchrun), or method='ste'/'stableqat'."
        )
    if getattr(args, "fsdp", None):
        raise ValueError(
            "LotionTrainer with method='lotion' does not support FSDP yet (the regulariser needs whole weight "
            "rows and their gradients). Use DDP (torchrun), or method='ste'/'stableqat'."
        )
