"""An independent computation of one LOTION gradient, for the per-path tests.

For a batch of causal-LM examples it returns, per quantized layer, the gradient of

    L(w) + (lambda/2) sum G s^2 p (1 - p)

at the current latent weights, with `L` the mean cross-entropy over every target token of the batch and
`G` the per-token empirical Fisher `sum_t delta_t^2 x_t^2 / N` (`delta_t` the gradient of the *summed*
loss at the layer's output at position t, `x_t` the layer's input). It uses a float64 copy of the model
with plain `nn.Linear` layers, forward hooks, and the penalty's slope written out by hand: nothing of
hf_lotion's penalty machinery.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import hf_lotion


def hand_slope(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """`s (1 - 2p)` with absmax scales on the full-range grid, zero on grid points (float64)."""
    out, n_in = weight.shape
    group = n_in if group_size == -1 else group_size
    w = weight.detach().to(torch.float64).reshape(out, n_in // group, group)
    # Scales as the model stores them: fp32 absmax / (2^(b-1) - 1/2), rounded to the weight dtype.
    s = weight.detach().float().abs().reshape(out, n_in // group, group).amax(-1) / (2 ** (bits - 1) - 0.5)
    s = s.to(weight.dtype).to(torch.float64).unsqueeze(-1)
    v = (w / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    p = v - torch.floor(v)
    return torch.where(p > 0, s * (1 - 2 * p), 0.0).reshape(out, n_in)


def reference_gradients(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], lotion_lambda: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(loss gradient, curvature G, total LOTION gradient)` per quantized layer name, float64."""
    reference = copy.deepcopy(model)
    hf_lotion.nn.remove_penalty(reference)
    layers = dict(hf_lotion.lotion_layers(reference))
    specs = {name: layer.spec for name, layer in layers.items()}
    for name, layer in layers.items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        plain.weight, plain.bias = layer.weight, layer.bias
        reference.set_submodule(name, plain)
    reference = reference.to(torch.float64).train()
    inputs, deltas = {}, {}

    def capture(name):
        def hook(module, args, output):
            inputs.setdefault(name, []).append(args[0].detach())
            output.register_hook(lambda g: deltas.setdefault(name, []).append(g.detach()))

        return hook

    handles = [reference.get_submodule(name).register_forward_hook(capture(name)) for name in layers]
    total_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for batch in batches:
        logits = reference(input_ids=batch["input_ids"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()
    for handle in handles:
        handle.remove()
    loss_grads, curvature, total = {}, {}, {}
    for name, spec in specs.items():
        weight = reference.get_submodule(name).weight
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])
        d = torch.cat([t.reshape(-1, t.shape[-1]) for t in deltas[name]])  # one backward per batch, in order
        curvature[name] = (d.square().T @ x.square()) / total_tokens
        loss_grads[name] = weight.grad / total_tokens
        slope = hand_slope(model.get_submodule(name).weight, spec.bits, spec.group_size)
        total[name] = loss_grads[name] + 0.5 * lotion_lambda * curvature[name] * slope
    return loss_grads, curvature, total
