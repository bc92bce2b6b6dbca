"""Where a transformers model's loss is, and how many terms it averages over, for LOTION's penalty."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether `model`'s loss predicts `labels[..., 1:]` (causal LMs), as transformers' Trainer decides it."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover - older transformers
        return type(model).__name__.endswith("ForCausalLM")
    config = getattr(model, "config", None)
    causal = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    return causal and not getattr(config, "is_encoder_decoder", False)


def count_loss_tokens(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The loss's target count for one forward's keyword inputs (`labels` / `shift_labels`), or None.

    Example:
        >>> count_loss_tokens(nn.Linear(1, 1), {"labels": torch.tensor([[1, -100, 3]])})
        tensor(2)
    """
    shifted = inputs.get("shift_labels")
    if torch.is_tensor(shifted):
        return (shifted != IGNORE_INDEX).sum()
    labels = inputs.get("labels")
    if not torch.is_tensor(labels):
        return None
    if loss_shifts_labels(model):
        labels = labels[..., 1:]
    return (labels != IGNORE_INDEX).sum()


def anchor_model_loss(runtime, model: nn.Module, kwargs: dict[str, Any], output: Any, context) -> Any:
    """After a train-mode forward: put LOTION's penalty on the loss a transformers model returned.

    * `outputs.loss` (or `output[0]` of a tuple): a token mean of this micro-batch, or, when the loop passed
      `num_items_in_batch` (as `Trainer` does), a sum divided by all micro-batches' tokens: the penalty then
      enters with this micro-batch's share, so that the shares of one optimizer step sum to one.
    * TRL's fused LM head returns per-token `log_probs` with a `label_mask`, and its SFT trainer uses their
      negated token mean as the loss: those get anchored too. Losses of other shapes built from them (for
      example TRL's `loss_type="dft"`, which weighs tokens by their probability) are not token means: the
      penalty's scale there is approximate.

    Returns the output with anchors in place, or None to leave it as is (no loss: `add_lotion_penalty`).
    """
    loss = _output_loss(output)
    if loss is not None and not loss.requires_grad:
        loss = None
    log_probs = output.get("log_probs") if isinstance(output, Mapping) else None
    mask = output.get("label_mask") if isinstance(output, Mapping) else None
    if not (torch.is_tensor(log_probs) and log_probs.requires_grad and torch.is_tensor(mask)):
        log_probs = None
    if loss is None and log_probs is None:
        return None
    tokens = count_loss_tokens(model, kwargs)
    if tokens is None and log_probs is not None:
        tokens = mask.sum()
    if tokens is None:
        runtime.warn_once(
            "tokens",
            "LOTION's penalty could not be added to the model's loss: the forward had no `labels` keyword to "
            "count the loss's tokens from. Add it yourself with "
            "`loss = hf_lotion.add_lotion_penalty(model, loss, num_tokens=...)`.",
        )
        return None
    if log_probs is not None:
        output["log_probs"] = runtime.anchor_token_terms(log_probs, mask, context, tokens)
    if loss is None:
        return output
    num_items = kwargs.get("num_items_in_batch")
    share = None
    if num_items is not None:
        # nn.DataParallel (several GPUs without torchrun): Trainer passes `(n_gpu, 1)` copies of the count.
        share = tokens / torch.as_tensor(num_items, device=tokens.device).reshape(-1)[0]
    return _replace_loss(output, runtime.anchor_loss(loss, context, tokens, share))


def _output_loss(output: Any) -> torch.Tensor | None:
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].dim() == 0:
        loss = output[0]
    else:
        loss = None
    return loss if torch.is_tensor(loss) else None


def _replace_loss(output: Any, loss: torch.Tensor) -> Any:
    if isinstance(output, Mapping):
        output["loss"] = loss
        return output
    return (loss, *output[1:])
