"""A method's penalty (LOTION's) inside the autograd graph, so that it trains in any loop.

`L(w) + (lambda/2) sum G sigma^2(w)` is trained by three autograd pieces that a `PenaltyRuntime`, installed
on the root model by `hf_lotion.prepare` / `from_pretrained`, wires together:

* an **anchor** on the loss (attached to the model's outputs by a forward hook the glue layer supplies, or
  by `add_lotion_penalty`). The loss's value is unchanged; in backward the anchor runs before any layer
  and reads `c`, the gradient that reached the loss: gradient-accumulation division, an fp16 loss scale,
  and the micro-batch's share of the tokens when the loss was normalised over several micro-batches.
* a **penalty node** on each quantized layer's effective weight (the latent weight, or under adapters
  `W + scaling * B A`): identity forward; backward adds `c * (lambda/2) G s (1 - 2p)`, so the penalty's
  gradient reaches whatever the effective weight is made of, and DDP averages it with the rest.
* a **curvature probe** on the layer's output: from the output gradients `delta_t` and the inputs `x_t`
  (saved as autograd saves tensors, so activation checkpointing recomputes them) it adds
  `sum_t delta_t^2 x_t^2` (one matmul the size of the weight gradient), rescaled by `(n / c)^2` to the
  per-token scale, `n` the micro-batch's loss-token count. Over an optimizer step (all micro-batches, all
  ranks) that sum divided by the tokens is the per-token empirical Fisher, folded into an EMA when the step
  ends. Its scale does not depend on batch size, accumulation or loss scaling.

An optimizer step ends the window (a global `torch.optim` post-step hook; a change of the trainable
parameters' version counters catches hand-written updates). The penalty uses the EMA of finished steps;
before the first one it uses the current micro-batch's own estimate, so LOTION acts from the first step.
Nothing here synchronises the host with the device except the fold at the end of a step.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..methods import Penalty

logger = logging.getLogger(__name__)

_LIVE_RUNTIMES: weakref.WeakSet[PenaltyRuntime] = weakref.WeakSet()


class ForwardContext:
    """What one train-mode forward of the model shares with its layers' backward."""

    __slots__ = ("fisher_due", "local_fisher", "multiplier", "penalized", "runtime", "tokens", "weighed")

    def __init__(self, runtime: PenaltyRuntime, fisher_due: bool) -> None:
        self.runtime = runtime
        self.fisher_due = fisher_due
        self.tokens: torch.Tensor | None = None  # the terms this micro-batch's loss averages over
        self.multiplier: torch.Tensor | None = None  # the gradient that reached the loss, times the share
        self.local_fisher: dict[str, torch.Tensor] = {}  # this micro-batch's estimate, before any EMA
        self.penalized: set[str] = set()  # layers whose penalty this backward added (shared layers: once)
        self.weighed: set[str] = set()  # layers whose tokens this forward's curvature already counted


class _LossAnchor(torch.autograd.Function):
    """Identity on the loss; backward records the gradient that reached it (times the share)."""

    @staticmethod
    def forward(ctx, loss, context, share):
        ctx.context, ctx.share = context, share
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        multiplier = grad.detach()
        if ctx.share is not None:
            multiplier = multiplier * ctx.share
        # One loss value, possibly shaped `(n, 1)` under nn.DataParallel (copies the trainer averages): the
        # gradient that reached it is the sum over its elements.
        ctx.context.runtime.receive(ctx.context, multiplier.sum())
        return grad, None, None


class _TokenLossAnchor(torch.autograd.Function):
    """Identity on per-token log-likelihoods whose token mean (negated) is the loss.

    For `loss = -c * sum(terms) / N` the gradient at each counted token is `-c / N`, so the gradient that
    reached the loss, times this micro-batch's share `n / N`, is minus the sum over its `n` counted tokens.
    """

    @staticmethod
    def forward(ctx, terms, mask, context):
        ctx.save_for_backward(mask)
        ctx.context = context
        return terms.clone()

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        ctx.context.runtime.receive(ctx.context, -(grad.detach() * mask).sum())
        return grad, None, None


class _PenaltyNode(torch.autograd.Function):
    """Identity on a layer's effective weight; backward adds the penalty's gradient."""

    @staticmethod
    def forward(ctx, weight, scales, layer, context):
        ctx.save_for_backward(weight, scales)
        ctx.layer, ctx.context = layer, context
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        weight, scales = ctx.saved_tensors
        grad = ctx.context.runtime.penalty_backward(ctx.layer, ctx.context, grad, weight, scales)
        return grad, None, None, None


class _CurvatureProbe(torch.autograd.Function):
    """Identity on a layer's output; backward folds `delta^2` against the saved input's `x^2`."""

    @staticmethod
    def forward(ctx, y, x, name, context):
        ctx.save_for_backward(x.detach())
        ctx.name, ctx.context = name, context
        return y.view_as(y)

    @staticmethod
    def backward(ctx, delta):
        (x,) = ctx.saved_tensors
        ctx.context.runtime.observe(ctx.name, x, delta, ctx.context)
        return delta, None, None, None


LossHook = Callable[["PenaltyRuntime", nn.Module, dict[str, Any], Any, ForwardContext], Any]


class PenaltyRuntime:
    """The penalty of one model: its curvature state, the current step window and the forward hooks.

    Created by `install_penalty`; layers find it through `layer.penalty_runtime`. It holds no reference to
    the model. `state_dict()` / `load_state_dict()` carry the curvature across checkpoints.
    """

    def __init__(
        self, penalty: Penalty, layers: list[tuple[str, nn.Module]], loss_hook: LossHook | None
    ) -> None:
        self.penalty = penalty
        self.loss_hook = loss_hook
        self.layers = {name: weakref.ref(layer) for name, layer in layers}
        self.ema: dict[str, torch.Tensor] = {}
        self.layer_updates: dict[str, int] = {}  # estimates folded into each layer's EMA (bias correction)
        self.updates = 0  # optimizer steps whose curvature was folded
        self.step = 0  # optimizer steps seen (windows closed)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_tokens: dict[str, torch.Tensor] = {}
        self.current: ForwardContext | None = None  # set during the model's forward
        self.last: ForwardContext | None = None  # the latest forward of the open window
        self.window_open = False
        self.window_due = False
        self.window_version: int | None = None
        self.trainable: list[weakref.ref] = []
        self.invalid: torch.Tensor | None = None  # a loss gradient that was negative or not finite
        self.penalty_total: torch.Tensor | None = None
        self.penalty_passes = 0
        self._warned: set[str] = set()
        _LIVE_RUNTIMES.add(self)

    # -- the model's forward -----------------------------------------------------------------------------

    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            self.current = None
            return
        if getattr(module, "_is_replica", False):
            raise ValueError(
                "LOTION's penalty cannot train under nn.DataParallel: its replicas run in threads "
                "that share one curvature state and own no parameters, so steps could not be told apart. Use "
                "DistributedDataParallel (torchrun or accelerate launch), or method='ste'/'stableqat'."
            )
        _LIVE_RUNTIMES.add(self)  # again after a deepcopy of the model, which copies the runtime
        trainable = [p for p in module.parameters() if p.requires_grad]
        version = sum(p._version for p in trainable)
        if self.window_open and self.window_version is not None and version != self.window_version:
            self.close_window()  # the weights changed without an optimizer: a hand-written update
        if not self.window_open:
            self.window_open, self.window_version = True, version
            self.window_due = self.updates == 0 or self.step % self.penalty.curvature_every == 0
            self.trainable = [weakref.ref(p) for p in trainable]
        self.current = ForwardContext(self, fisher_due=self.window_due)

    @torch.compiler.disable
    def post_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        context, self.current = self.current, None
        if context is None:
            return None
        self.last = context
        return None if self.loss_hook is None else self.loss_hook(self, module, kwargs, output, context)

    def anchor_loss(
        self, loss: torch.Tensor, context: ForwardContext, tokens: torch.Tensor, share: torch.Tensor | None
    ) -> torch.Tensor:
        """`loss` (a mean over `tokens` terms, times `share`) carrying the penalty into its backward."""
        context.tokens = tokens.detach()
        return _LossAnchor.apply(loss, context, share)

    def anchor_token_terms(
        self, terms: torch.Tensor, mask: torch.Tensor, context: ForwardContext, tokens: torch.Tensor
    ) -> torch.Tensor:
        """Per-token log-likelihoods (counted where `mask`) whose negated token mean a trainer uses as loss."""
        context.tokens = tokens.detach()
        return _TokenLossAnchor.apply(terms, mask, context)

    def receive(self, context: ForwardContext, multiplier: torch.Tensor) -> None:
        """An anchor's backward: the gradient that reached the loss, before any layer's backward runs.

        A zero gradient (a micro-batch without targets) contributes nothing; a negative or non-finite one
        is dropped and reported when the step ends (checking it here would synchronise with the device).
        """
        valid = torch.isfinite(multiplier) & (multiplier >= 0)
        self.invalid = ~valid if self.invalid is None else self.invalid | ~valid
        context.multiplier = torch.where(valid, multiplier, torch.zeros_like(multiplier))
        self.penalty_passes += 1

    # -- the step window ---------------------------------------------------------------------------------

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return any(ref() is not None and id(ref()) in ids for ref in self.trainable)

    def close_window(self) -> None:
        """An optimizer step consumed this window's gradients: fold its curvature into the EMA."""
        if not self.window_open:
            return
        self.window_open, self.window_version, self.last = False, None, None
        self.step += 1
        if self.window_due:
            self._fold()
        if self.invalid is not None and bool(self.invalid):
            self.warn_once(
                "multiplier",
                "LOTION's penalty skipped a backward whose loss gradient was negative or not finite: the penalty "
                "needs a loss that is minimised.",
            )
        self.invalid = None

    def _fold(self) -> None:
        """Per layer: the step's summed curvature over its tokens, all ranks together, into the EMA.

        Every rank reduces the same tensors in the same order (zeros where it saw nothing), so ranks whose
        micro-batches reached different layers (or none) cannot deadlock.
        """
        layers = {name: ref() for name, ref in sorted(self.layers.items())}
        names = [name for name, layer in layers.items() if layer is not None]
        sums, counts = [], []
        for name in names:
            total = self.pending.get(name)
            if total is None:
                weight = layers[name].weight
                total = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
            sums.append(total)
            count = self.pending_tokens.get(name)
            counts.append(
                torch.zeros((), device=total.device) if count is None else count.to(total.device, total.dtype)
            )
        self.pending, self.pending_tokens = {}, {}
        tokens = torch.stack(counts)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tokens)
            for total in sums:
                torch.distributed.all_reduce(total)
        counted = tokens.tolist()
        estimates = {name: sums[i] / tokens[i] for i, name in enumerate(names) if counted[i] > 0}
        if not all(bool(torch.isfinite(estimate).all()) for estimate in estimates.values()):
            logger.info("Skipping LOTION's curvature update of step %d: non-finite gradients.", self.step)
            return
        beta = self.penalty.curvature_beta
        for name, estimate in estimates.items():
            ema = self.ema.get(name)
            if ema is None or ema.shape != estimate.shape:
                self.ema[name], self.layer_updates[name] = estimate.mul_(1.0 - beta), 1
            else:
                ema.mul_(beta).add_(estimate.to(ema.device), alpha=1.0 - beta)
                self.layer_updates[name] += 1
        if estimates:
            self.updates += 1

    # -- what the layers call ----------------------------------------------------------------------------

    def context(self) -> ForwardContext | None:
        """The forward this layer call belongs to (also during a checkpointed recomputation)."""
        return self.current if self.current is not None else self.last

    @torch.compiler.disable
    def penalize_weight(
        self, layer: nn.Module, weight: torch.Tensor, scales: torch.Tensor, context: ForwardContext
    ) -> torch.Tensor:
        """`weight` with the penalty node on it (the same in a checkpointed recomputation)."""
        return _PenaltyNode.apply(weight, scales.detach(), layer, context)

    @torch.compiler.disable
    def probe_output(
        self, name: str, x: torch.Tensor, y: torch.Tensor, context: ForwardContext
    ) -> torch.Tensor:
        """`y = x W^T (+ b)` with the curvature probe on it."""
        return _CurvatureProbe.apply(y, x, name, context)

    def observe(self, name: str, x: torch.Tensor, delta: torch.Tensor, context: ForwardContext) -> None:
        """Add `(n / c)^2 sum_t delta_t^2 x_t^2` to the step's curvature of layer `name`."""
        multiplier = context.multiplier
        if multiplier is None:
            self.warn_unanchored()
            return
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        delta2 = delta.detach().reshape(-1, delta.shape[-1]).to(dtype).square()
        x2 = x.reshape(-1, x.shape[-1]).to(dtype).square()
        multiplier = multiplier.to(device=delta2.device, dtype=dtype)
        counted = multiplier > 0
        tokens = torch.where(counted, context.tokens.to(device=delta2.device, dtype=dtype), 0.0)
        # delta = (c / n) * d(sum of per-token losses)/dy, so (n / c)^2 delta^2 is on the per-token scale.
        factor = torch.where(counted, tokens / torch.where(counted, multiplier, 1.0), 0.0).square()
        contribution = (delta2.T @ x2).mul_(factor)
        first_call = name not in context.weighed
        context.weighed.add(name)
        if name in self.pending:
            self.pending[name].add_(contribution)
            if first_call:
                self.pending_tokens[name].add_(tokens)
        else:
            self.pending[name] = contribution
            self.pending_tokens[name] = tokens.clone()
        if not self.layer_updates.get(name):
            local = contribution / tokens.clamp_min(1.0)
            previous = context.local_fisher.get(name)
            context.local_fisher[name] = local if previous is None else previous + local

    def penalty_backward(
        self,
        layer: nn.Module,
        context: ForwardContext,
        grad: torch.Tensor,
        weight: torch.Tensor,
        scales: torch.Tensor,
    ) -> torch.Tensor:
        """The effective weight's gradient plus the penalty's, `c * coefficient * G * slope`."""
        multiplier = context.multiplier
        if multiplier is None:
            self.warn_unanchored()
            return grad
        if layer.penalty_name in context.penalized:
            return grad  # a layer called twice in one forward (shared weights) is penalised once
        context.penalized.add(layer.penalty_name)
        curvature, coefficient = self._curvature(layer.penalty_name, context, weight)
        if curvature is None:
            return grad
        multiplier = multiplier.to(device=weight.device, dtype=torch.float32)
        grad, value = self.penalty.gradient(
            grad, weight, scales, curvature, layer.spec, coefficient, multiplier
        )
        value = value.detach().float()
        self.penalty_total = (
            value if self.penalty_total is None else self.penalty_total + value.to(self.penalty_total.device)
        )
        return grad

    def _curvature(
        self, name: str, context: ForwardContext, weight: torch.Tensor
    ) -> tuple[torch.Tensor | None, float]:
        half = 0.5 * self.penalty.strength
        ema, count = self.ema.get(name), self.layer_updates.get(name, 0)
        if count and ema is not None and ema.shape == weight.shape:
            if ema.device != weight.device:
                ema = self.ema[name] = ema.to(weight.device)
            return ema, half / (1.0 - self.penalty.curvature_beta**count)
        return context.local_fisher.get(name), half

    def pop_penalty(self) -> float | None:
        """The penalty's mean value per backward pass since the last call (for logging), or None."""
        if self.penalty_total is None or not self.penalty_passes:
            return None
        value = float(self.penalty_total) / self.penalty_passes
        self.penalty_total, self.penalty_passes = None, 0
        return value

    # -- warnings ----------------------------------------------------------------------------------------

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def warn_unanchored(self) -> None:
        self.warn_once(
            "unanchored",
            "LOTION's penalty did not reach this backward: the loss was not the model's own `outputs.loss` "
            "(for example it was computed from the logits). This step trains without the penalty. Add it "
            "with `loss = hf_lotion.add_lotion_penalty(model, loss, num_tokens=...)` before `backward()`.",
        )

    # -- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The curvature EMA (fp32 per layer) with its per-layer estimate counts, and the step counts."""
        return {
            "step": self.step,
            "updates": self.updates,
            "ema": dict(self.ema),
            "layer_updates": dict(self.layer_updates),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.updates = int(state["updates"])
        self.ema = {name: tensor.clone() for name, tensor in state["ema"].items()}
        self.layer_updates = {name: int(count) for name, count in state["layer_updates"].items()}
        self.pending, self.pending_tokens = {}, {}
        self.window_open, self.window_version, self.last = False, None, None


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for runtime in list(_LIVE_RUNTIMES):
        if runtime.window_open and runtime.owns(optimizer):
            runtime.close_window()


register_optimizer_step_post_hook(_on_optimizer_step)


def penalty_runtime(model: nn.Module) -> PenaltyRuntime | None:
    """The `PenaltyRuntime` of `model` (or of a wrapper around it: DDP, a PEFT model), if any."""
    for module in model.modules():
        runtime = module.__dict__.get("_hf_lotion_penalty")
        if runtime is not None:
            return runtime[0]
    return None


def install_penalty(
    model: nn.Module,
    penalty: Penalty | None,
    layers: list[tuple[str, nn.Module]],
    loss_hook: LossHook | None = None,
) -> PenaltyRuntime | None:
    """Attach a penalty runtime to `model` (replacing any) and point `layers` at it; `None` removes it.

    `loss_hook(runtime, model, kwargs, output, context)` runs after each train-mode forward and may return
    the output with its loss anchored (`runtime.anchor_loss` / `runtime.anchor_token_terms`).
    """
    remove_penalty(model)
    if penalty is None or not layers:
        return None
    runtime = PenaltyRuntime(penalty, layers, loss_hook)
    for name, layer in layers:
        layer.penalty_name = name
        layer.penalty_runtime = runtime
    handles = (
        model.register_forward_pre_hook(runtime.pre_forward),
        model.register_forward_hook(runtime.post_forward, with_kwargs=True),
    )
    model._hf_lotion_penalty = (runtime, handles)
    return runtime


def remove_penalty(model: nn.Module) -> None:
    """Detach the penalty runtime of `model`, if any (its layers then train without a penalty)."""
    entry = model.__dict__.pop("_hf_lotion_penalty", None)
    if entry is None:
        return
    runtime, handles = entry
    for handle in handles:
        handle.remove()
    _LIVE_RUNTIMES.discard(runtime)
    for module in model.modules():
        if getattr(module, "penalty_runtime", None) is runtime:
            module.penalty_runtime = None


def add_lotion_penalty(model: nn.Module, loss: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """Return `loss` carrying LOTION's penalty, for a loss the model did not compute itself.

    Models that compute their loss from `labels` get the penalty automatically; call this when the loss is
    computed outside the model (from the logits), after the forward and before `backward()`.

    Args:
        model: the model (or a DDP/PEFT wrapper) whose latest train-mode forward produced `loss`.
        loss: the loss to back-propagate, a mean over `num_tokens` terms (scale it as you like afterwards:
            accumulation division and loss scaling are read in backward).
        num_tokens: how many terms `loss` averages over (tokens with a target, or examples).

    Example:
        >>> logits = model(input_ids=ids).logits  # doctest: +SKIP
        >>> loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # doctest: +SKIP
        >>> hf_lotion.add_lotion_penalty(model, loss, num_tokens=ids[:, 1:].numel()).backward()  # doctest: +SKIP
    """
    runtime = penalty_runtime(model)
    if runtime is None:
        raise ValueError(
            f"{type(model).__name__} has no LOTION penalty: quantize it with LotionConfig(method='lotion') "
            "(from_pretrained or hf_lotion.prepare), with lotion_lambda > 0."
        )
    context = runtime.context()
    if context is None:
        raise ValueError(
            "add_lotion_penalty found no train-mode forward of the model with gradients enabled in this step: "
            "call it after `model(...)` in train mode and before `backward()`."
        )
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, torch.Tensor)) or int(num_tokens) < 1:
        raise ValueError(
            f"add_lotion_penalty: num_tokens={num_tokens!r} is not supported; allowed: an integer >= 1."
        )
    tokens = torch.as_tensor(num_tokens, device=loss.device, dtype=torch.float32)
    return runtime.anchor_loss(loss, context, tokens, None)
