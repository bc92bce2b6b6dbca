"""`LotionRegularizer`: LOTION's curvature-weighted rounding-noise regulariser, applied after backward.

It is the one piece of training logic LOTION adds to an ordinary loop, shared by `LotionTrainer` and
hand-written loops::

    loss = model(**batch).loss
    loss.backward()
    regularizer.step(batch)        # curvature from the loss gradient, then + (lambda/2) G s (1 - 2p)
    optimizer.step()
    optimizer.zero_grad()

For the other methods (`ste`, `stableqat`, `rtn`) or `lotion_lambda = 0`, `step` does nothing, so one
loop trains every method.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hf_lotion import kernels
from hf_lotion.config import LotionConfig
from hf_lotion.nn import LotionLinear, lotion_layers
from hf_lotion.quant.lotion import lotion_penalty_and_grad

from .curvature import IGNORE_INDEX, FisherCurvature, GaussNewtonCurvature, build_estimator

logger = logging.getLogger(__name__)


def lotion_config_of(model: nn.Module) -> LotionConfig | None:
    """The `LotionConfig` a model was quantized with (from its quantizer or `config.quantization_config`)."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, Mapping) and config.get("quant_method") == "lotion":
        config = LotionConfig.from_dict(dict(config))
    return config if isinstance(config, LotionConfig) else None


def count_target_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens a causal-LM loss averages over: shifted labels that are not -100 (else the attention mask)."""
    labels = batch.get("labels")
    if labels is not None:
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask[..., 1:].sum())
    input_ids = batch.get("input_ids")
    if input_ids is None:
        raise ValueError("Cannot count tokens: the batch has no `labels`, `attention_mask` or `input_ids`.")
    return int(input_ids[..., 1:].numel())


class LotionRegularizer:
    """Adds LOTION's regulariser gradient `(lambda/2) G s (1 - 2p)` to the quantized weights' gradients.

    Call `step` after the loss's backward (gradients complete, synchronized across ranks) and before
    `optimizer.step()`. It first updates the curvature estimate `G` from the *loss* gradients, then adds
    the regulariser's gradient in place (zero at grid points), and returns the regulariser's value.

    Settings come from the model's `LotionConfig` (`lotion_lambda`, `curvature`, `curvature_beta`,
    `curvature_every`), or from `config` for plain modules prepared with `hf_lotion.prepare`.

    Args:
        model: a model with `LotionLinear` layers (the unwrapped model, not a DDP wrapper).
        config: overrides the model's `LotionConfig`.
        seed: seeds the Gauss-Newton label sampling (step-indexed, so resuming repeats the same draws).

    Example:
        >>> regularizer = LotionRegularizer(model)  # doctest: +SKIP
        >>> loss = model(**batch).loss; loss.backward()  # doctest: +SKIP
        >>> regularizer.step(batch); optimizer.step(); optimizer.zero_grad()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, config: LotionConfig | None = None, seed: int = 0) -> None:
        layers = lotion_layers(model)
        if not layers:
            raise ValueError(
                f"{type(model).__name__} has no LotionLinear layers: load it with "
                "`from_pretrained(..., quantization_config=LotionConfig(...))` or call `hf_lotion.prepare(model)`."
            )
        methods = sorted({layer.spec.method for _, layer in layers})
        if config is None:
            config = lotion_config_of(model) or LotionConfig(method=methods[0])
        if not isinstance(config, LotionConfig):
            raise ValueError(f"LotionRegularizer needs a LotionConfig, got {type(config).__name__}.")
        config.post_init()  # re-validate: the config may have been edited after loading
        self.model = model
        self.strength = config.lotion_lambda
        self.seed = int(seed)
        self.layers: dict[str, LotionLinear] = {
            name: layer
            for name, layer in layers
            if layer.spec.method == "lotion" and layer.weight.requires_grad
        }
        self.active = bool(self.layers) and self.strength > 0
        self.estimator = build_estimator(config.curvature, config.curvature_beta, config.curvature_every)
        self.steps = 0

    def step(
        self,
        batch: Mapping[str, Any] | None = None,
        num_tokens: float | None = None,
        grad_scale: float = 1.0,
    ) -> torch.Tensor | None:
        """Update the curvature and add the regulariser's gradient; returns its value (None if inactive).

        Args:
            batch: the step's (last) batch: counts the tokens when `num_tokens` is not given, and feeds
                the Gauss-Newton estimator's sampled-label pass when one is due.
            num_tokens: tokens the loss averaged over in this optimizer step (all micro-batches and ranks).
            grad_scale: the fp16 loss scale the gradients still carry (1.0 otherwise).
        """
        if not self.active:
            return None
        if num_tokens is None:
            if batch is None:
                raise ValueError(
                    "LotionRegularizer.step needs the batch or num_tokens to scale the curvature."
                )
            num_tokens = count_target_tokens(batch)
        step, self.steps = self.steps, self.steps + 1
        estimator = self.estimator
        if isinstance(estimator, FisherCurvature) and self._fisher_fuses(grad_scale):
            # Curvature update and regulariser in one kernel pass per layer.
            fisher = estimator.begin_fused_update(float(num_tokens), grad_scale)
            values = [
                self._add_regularizer(layer, estimator.state(name, layer.weight), grad_scale, fisher)
                for name, layer in self.layers.items()
            ]
            return torch.stack(values).sum()
        self._update_curvature(step, batch, float(num_tokens), grad_scale)

        values = []
        for name, layer in self.layers.items():
            curvature = estimator.estimate(name)
            if curvature is not None:
                values.append(self._add_regularizer(layer, curvature, grad_scale))
        return torch.stack(values).sum() if values else torch.zeros(())

    @staticmethod
    def _on_kernels(layer: LotionLinear) -> bool:
        """Whether this layer's regulariser step runs as the fused Triton kernel (in place on `.grad`)."""
        grad = layer.weight.grad
        return grad is not None and grad.is_contiguous() and kernels.lotion_kernel_available(layer.weight)

    def _fisher_fuses(self, grad_scale: float) -> bool:
        for layer in self.layers.values():
            if not self._on_kernels(layer):
                return False
            if grad_scale != 1.0 and not torch.isfinite(layer.weight.grad).all():
                return False  # the reference path skips the curvature update of an overflowed step
        return True

    def _add_regularizer(
        self,
        layer: LotionLinear,
        curvature: torch.Tensor,
        grad_scale: float,
        fisher: tuple[float, float, float] | None = None,
    ) -> torch.Tensor:
        """Add `(lambda/2) G s (1 - 2p)` to the layer's gradient; returns the penalty (fp32 scalar).

        With `fisher`, `curvature` is the EMA state, updated from the gradient in the same kernel pass.
        """
        spec, weight = layer.spec, layer.weight.detach()
        if self._on_kernels(layer):
            return kernels.lotion_regularizer_step_(
                weight,
                layer.quant_scales(),
                layer.weight.grad,
                curvature,
                spec.bits,
                spec.group_size,
                self.strength,
                grad_scale,
                fisher,
            )
        assert fisher is None, "the fused Fisher update exists only as a kernel"
        value, grad = lotion_penalty_and_grad(
            weight, layer.quant_scales(), curvature, spec.bits, spec.group_size, self.strength
        )
        if grad_scale != 1.0:
            grad = grad * grad_scale
        if layer.weight.grad is None:
            layer.weight.grad = grad
        else:
            layer.weight.grad.add_(grad)
        return value.float()

    def needs_batch(self) -> bool:
        """Whether the next `step` runs a sampled-label pass and so needs the batch on the model's device."""
        return self.active and self.estimator.is_due(self.steps)

    def _update_curvature(
        self, step: int, batch: Mapping[str, Any] | None, num_tokens: float, grad_scale: float
    ):
        estimator = self.estimator
        if isinstance(estimator, FisherCurvature):
            grads = {
                name: layer.weight.grad
                for name, layer in self.layers.items()
                if layer.weight.grad is not None
            }
            if grad_scale != 1.0 and not all(torch.isfinite(g).all() for g in grads.values()):
                logger.info("Skipping the curvature update of step %d: fp16 gradients overflowed.", step)
                return
            estimator.observe(grads, num_tokens, grad_scale)
        elif isinstance(estimator, GaussNewtonCurvature) and estimator.is_due(step):
            if batch is None:
                raise ValueError("LotionConfig.curvature='gauss_newton' needs the batch passed to step().")
            device = next(iter(self.layers.values())).weight.device
            generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)
            weights = {name: layer.weight for name, layer in self.layers.items()}
            estimator.observe_samples(self.model, weights, batch, generator)

    def state_dict(self) -> dict[str, Any]:
        """Curvature state and step count (saved in Trainer checkpoints, so resume continues exactly)."""
        return {"steps": self.steps, "curvature": self.estimator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.estimator.load_state_dict(state["curvature"])
        self.steps = int(state["steps"])
