"""The scale of LOTION's curvature estimate against batch size, gradient accumulation and loss scaling.

A tiny byte-level Llama (hidden 128, 2 layers, 4-bit group 32) on the embedded corpus, at its random init
and after 100 AdamW steps of full-precision training. For each batch size, the mean over all quantized
weights of

* the per-token empirical Fisher `sum_t delta_t^2 x_t^2 / N` (hf_lotion's estimate), and
* `N * (mean gradient)^2`, the estimate hf-lotion used before: its `N (E g)^2` term grows with the batch.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/curvature_scale.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import LlamaForCausalLM

import hf_lotion
from hf_lotion.trainer.recipes import byte_lm_splits, tiny_llama_config


def quantized(state=None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    hf_lotion.prepare(model, hf_lotion.LotionConfig(bits=4, group_size=32))
    if state is not None:
        model.load_state_dict(state)
    return model.train()


def estimates(state, batches, scale=1.0):
    """(per-token Fisher per layer, old estimate per layer) after one optimizer step's backward passes."""
    model = quantized(state)
    for batch in batches:
        (model(input_ids=batch, labels=batch).loss * scale / len(batches)).backward()
    runtime = hf_lotion.penalty_runtime(model)
    runtime.close_window()
    beta = runtime.penalty.curvature_beta
    tokens = sum(batch.shape[0] * (batch.shape[1] - 1) for batch in batches)
    fisher = {name: ema / (1 - beta) for name, ema in runtime.ema.items()}
    old = {
        name: tokens * (layer.weight.grad / scale).square() for name, layer in hf_lotion.lotion_layers(model)
    }
    return fisher, old


def mean(values: dict) -> float:
    return torch.stack([v.mean() for v in values.values()]).mean().item()


def main() -> None:
    train, _ = byte_lm_splits(seq_len=128)
    blocks = train.blocks
    model = quantized()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    states = {"random init": {k: v.clone() for k, v in model.state_dict().items()}}
    hf_lotion.nn.remove_penalty(model)  # plain full-precision pre-training of the latent weights
    for _ in range(100):
        batch = blocks[torch.randint(0, len(blocks), (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    states["after 100 steps"] = {k: v.clone() for k, v in model.state_dict().items()}

    print("| model | batch | per-token Fisher (mean G) | N * mean_grad^2 (before) |")
    print("|---|---|---|---|")
    for label, state in states.items():
        for batch_size in (4, 16, 64):
            fisher, old = estimates(state, [blocks[1000 : 1000 + batch_size]])
            print(f"| {label} | {batch_size} | {mean(fisher):.3e} | {mean(old):.3e} |")
    batch = blocks[1000:1016]
    whole, _ = estimates(states["random init"], [batch])
    accumulated, _ = estimates(states["random init"], list(batch.chunk(4)))
    scaled, _ = estimates(states["random init"], [batch], scale=2.0**16)
    worst = max(
        float(((accumulated[n] - g).abs() / g.abs().clamp_min(1e-30)).max()) for n, g in whole.items()
    )
    identical = all(torch.equal(scaled[n], g) for n, g in whole.items())
    print(f"\n1x16 vs 4x4 accumulation: largest relative difference {worst:.1e}")
    print(f"loss scaled by 2^16 (fp16 GradScaler): bit-identical to unscaled: {identical}")


if __name__ == "__main__":
    main()
