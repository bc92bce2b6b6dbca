"""Diagonal curvature estimates `G` for LOTION's regulariser `(lambda / 2) sum G_ii sigma_i^2`.

Both estimators keep an EMA (with Adam-style bias correction) of `N * g**2`, where `g` is the gradient
of a *mean* loss over `N` tokens: a squared mean gradient is about `1/N` of the per-token Fisher, so the
factor `N` puts `G` on the scale of the loss's own curvature and makes `lambda = 1` meaningful.

* `FisherCurvature` (empirical Fisher): `g` is the training gradient itself, read after backward and
  *before* the regulariser's gradient is added. Reading it from an optimizer state that already holds
  the regulariser's gradient makes the term feed on itself (diverged in a prototype), so it has its own
  state instead of AdamW's second moment. No extra pass.
* `GaussNewtonCurvature`: every `every` steps, one extra forward and backward with labels sampled from
  the model's own predictive distribution (Sophia's estimator of the Gauss-Newton diagonal for
  cross-entropy). Under data parallelism the estimate is averaged over ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class CurvatureEstimator:
    """An EMA of `N * g**2` per quantized weight, keyed by layer name."""

    name = ""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.updates = 0
        self.ema: dict[str, torch.Tensor] = {}

    def is_due(self, step: int) -> bool:
        """Whether `step` (0-based optimizer step) needs a sampled-label pass."""
        return False

    def update(self, squares: Mapping[str, torch.Tensor]) -> None:
        """Fold one estimate of `N * g**2` per layer into the EMA."""
        for name, square in squares.items():
            ema = self.ema.get(name)
            if ema is None:
                self.ema[name] = (1.0 - self.beta) * square.float()
            else:
                ema.mul_(self.beta).add_(square.float(), alpha=1.0 - self.beta)
        self.updates += 1

    def bias_correction(self) -> float:
        """`1 / (1 - beta**updates)`: the first estimates are not shrunk toward the zero initial state."""
        return 1.0 / (1.0 - self.beta**self.updates) if self.updates else 0.0

    def estimate(self, name: str) -> torch.Tensor | None:
        """The curvature of layer `name` (fp32, the weight's shape), or None before the first update."""
        ema = self.ema.get(name)
        return None if ema is None else ema * self.bias_correction()

    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.name, "beta": self.beta, "updates": self.updates, "ema": dict(self.ema)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("estimator") != self.name:
            raise ValueError(
                f"The saved curvature state comes from estimator {state.get('estimator')!r}, but this run "
                f"uses {self.name!r}; set LotionConfig.curvature={state.get('estimator')!r} to resume it."
            )
        self.updates = int(state["updates"])
        self.ema = {name: tensor.float().clone() for name, tensor in state["ema"].items()}


class FisherCurvature(CurvatureEstimator):
    """Empirical Fisher: EMA of `N * grad**2` of the training loss (no extra pass)."""

    name = "fisher"

    def observe(self, grads: Mapping[str, torch.Tensor], num_tokens: float, grad_scale: float = 1.0) -> None:
        """Update from the loss gradients of one optimizer step (`grad_scale`: an fp16 loss scale to undo)."""
        factor = float(num_tokens) / (grad_scale * grad_scale)
        self.update({name: grad.float().square().mul_(factor) for name, grad in grads.items()})

    def begin_fused_update(self, num_tokens: float, grad_scale: float = 1.0) -> tuple[float, float, float]:
        """For a kernel that updates the EMA itself: count the update, return `(beta, factor, bias_correction)`.

        The kernel computes `ema <- beta * ema + (1 - beta) * factor * grad**2` and uses `ema * bias_correction`,
        which is `observe` followed by `estimate`.
        """
        self.updates += 1
        return self.beta, float(num_tokens) / (grad_scale * grad_scale), self.bias_correction()

    def state(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The EMA tensor of layer `name` (fp32, contiguous), zeros on first use: `beta * 0 + ...` is exact."""
        ema = self.ema.get(name)
        if ema is None:
            ema = self.ema[name] = torch.zeros(like.shape, device=like.device, dtype=torch.float32)
        return ema


class GaussNewtonCurvature(CurvatureEstimator):
    """Gauss-Newton diagonal from labels sampled from the model, refreshed every `every` optimizer steps."""

    name = "gauss_newton"

    def __init__(self, beta: float, every: int) -> None:
        super().__init__(beta)
        self.every = every

    def is_due(self, step: int) -> bool:
        return step % self.every == 0

    def observe_samples(
        self,
        model: nn.Module,
        weights: Mapping[str, torch.Tensor],
        inputs: Mapping[str, Any],
        generator: torch.Generator,
    ) -> None:
        """Run the sampled-label pass on `inputs` (a causal-LM batch) and update the estimate.

        Gradients are taken with `torch.autograd.grad`, so `.grad` and any optimizer state are untouched.
        """
        grads, num_tokens = sampled_label_gradients(model, list(weights.values()), inputs, generator)
        squares = {}
        for (name, weight), grad in zip(weights.items(), grads, strict=True):
            grad = torch.zeros_like(weight) if grad is None else grad
            squares[name] = grad.float().square().mul_(float(num_tokens))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for square in squares.values():
                torch.distributed.all_reduce(square)
                square.div_(world)
        self.update(squares)


def sampled_label_gradients(
    model: nn.Module,
    weights: Sequence[torch.Tensor],
    inputs: Mapping[str, Any],
    generator: torch.Generator,
) -> tuple[tuple[torch.Tensor | None, ...], int]:
    """Gradients of the mean cross-entropy against labels drawn from the model's own next-token distribution.

    Positions follow the batch's labels (`-100` is skipped), else its attention mask. Returns the
    gradients and the number of sampled tokens.
    """
    labels = inputs.get("labels")
    forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    output = model(**forward_inputs)
    logits = getattr(output, "logits", None)
    if logits is None:
        raise ValueError(
            "LotionConfig.curvature='gauss_newton' samples labels from the model's `logits`, but "
            f"{type(model).__name__} returned none; use curvature='fisher' for models that are not causal LMs."
        )
    logits = logits[:, :-1].float()
    if labels is not None:
        mask = labels[:, 1:] != IGNORE_INDEX
    elif forward_inputs.get("attention_mask") is not None:
        mask = forward_inputs["attention_mask"][:, 1:].bool()
    else:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    selected = logits[mask]
    if selected.shape[0] == 0:
        return tuple(None for _ in weights), 0
    with torch.no_grad():
        probs = torch.softmax(selected, dim=-1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    loss = F.cross_entropy(selected, sampled)
    grads = torch.autograd.grad(loss, list(weights), allow_unused=True)
    return grads, int(selected.shape[0])


def build_estimator(curvature: str, beta: float, every: int) -> FisherCurvature | GaussNewtonCurvature:
    """The estimator named by `LotionConfig.curvature`."""
    if curvature == "fisher":
        return FisherCurvature(beta)
    if curvature == "gauss_newton":
        return GaussNewtonCurvature(beta, every)
    raise ValueError(
        f"LotionConfig.curvature={curvature!r} is not supported; allowed: 'fisher', 'gauss_newton'."
    )
