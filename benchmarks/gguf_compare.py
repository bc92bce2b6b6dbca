"""What a GGUF user gets: the exact QAT export vs llama.cpp's Q4_0 re-rounding, on a tiny byte-level Llama (CPU).

A tiny Llama is pretrained in full precision to a plateau, then fine-tuned at 4 bits (group 32,
`scale_dtype="float16"`) with STE, StableQAT and LOTION, several seeds. Eval loss (held-out bytes) of:

* (a) `exact`: `hf_lotion.export_gguf`, read back with gguf-py and dequantized from the file;
* (b) `requant_latent` / `requant_eval`: the same trained model re-quantized by llama.cpp's Q4_0 rule
  (`gguf.quants.quantize`) from its latent weights / from its eval-mode (already quantized) weights, what the
  usual route (dequantize, convert_hf_to_gguf, llama-quantize Q4_0) gives;
* (c) `fp_q4_0`: the full-precision model quantized by that rule (what users get without QAT).

Embeddings and the output head stay F32 everywhere, so only the quantized linear layers differ.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/gguf_compare.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gguf
import torch
from transformers import LlamaForCausalLM

import hf_lotion
from hf_lotion import LotionConfig, prepare
from hf_lotion.trainer.recipes import byte_lm_splits, tiny_llama_config

Q4_0 = gguf.GGMLQuantizationType.Q4_0


def batches(dataset, batch_size, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    blocks = dataset.blocks
    for _ in range(steps):
        yield blocks[torch.randint(0, blocks.shape[0], (batch_size,), generator=generator)]


@torch.no_grad()
def eval_loss(model, evals) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in evals.blocks.split(32)]
    return statistics.fmean(losses)


def train(model, data, steps, lr, seed, batch_size=16, evals=None, eval_at=()):
    """AdamW with warmup + cosine; returns `[(step, eval loss)]` at the steps in `eval_at`."""
    curve = []
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step, ids in enumerate(batches(data, batch_size, steps, seed), start=1):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step in eval_at:
            curve.append((step, round(eval_loss(model, evals), 4)))
            model.train()
    model.eval()
    return curve


def llama_q4_0(weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp's own Q4_0 rounding of a weight (gguf-py's bit-exact port of ggml-quants.c)."""
    array = weight.detach().float().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, Q4_0), Q4_0).copy())


def with_weights(fp_model, weights: dict[str, torch.Tensor], trained=None):
    """A full-precision copy of `fp_model` with `weights` (module name -> weight) swapped in, and the
    unquantized tensors (embeddings, norms, head) of `trained` (a QAT model) if given."""
    model = copy.deepcopy(fp_model)
    if trained is not None:
        own = model.state_dict()
        dense = {k: v for k, v in trained.state_dict().items() if k in own and v.shape == own[k].shape}
        model.load_state_dict(dense, strict=False)
    with torch.no_grad():
        for name, weight in weights.items():
            model.get_submodule(name).weight.copy_(weight)
    return model.eval()


def gguf_weights(path, model) -> dict[str, torch.Tensor]:
    """Quantized tensors of the file, dequantized by gguf-py, as module name -> weight in HF row order."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    to_hf = {names.get_name(name): name for name, _ in hf_lotion.lotion_layers(model)}
    weights = {}
    for tensor in gguf.GGUFReader(path).tensors:
        name = to_hf.get(tensor.name.removesuffix(".weight"))
        if name is None:
            continue
        w = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        if name.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads
            rows = w.shape[0]
            w = w.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
        weights[name] = w
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["ste", "stableqat", "lotion"])
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--qat-steps", type=int, default=150)
    parser.add_argument("--qat-lr", type=float, default=5e-4)
    parser.add_argument("--out", default="benchmarks/results/gguf_compare.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    logging.getLogger("hf_lotion.gguf_tokenizer").setLevel(logging.ERROR)  # no tokenizer here: byte ids

    train_data, evals = byte_lm_splits(seq_len=128, eval_blocks=64)
    torch.manual_seed(0)
    fp_model = LlamaForCausalLM(tiny_llama_config())
    start = time.perf_counter()
    eval_at = {args.pretrain_steps * k // 4 for k in (1, 2, 3, 4)}
    curve = train(
        fp_model, train_data, args.pretrain_steps, args.pretrain_lr, seed=1000, evals=evals, eval_at=eval_at
    )
    fp_loss = eval_loss(fp_model, evals)
    linear_names = [
        name
        for name, module in fp_model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    ]
    fp_q4_0 = eval_loss(
        with_weights(fp_model, {n: llama_q4_0(fp_model.get_submodule(n).weight) for n in linear_names}), evals
    )
    print(
        f"pretrained {args.pretrain_steps} steps in {time.perf_counter() - start:.0f}s, eval loss by step {curve}: "
        f"fp {fp_loss:.4f}, fp + llama.cpp Q4_0 {fp_q4_0:.4f}",
        flush=True,
    )

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            for seed in args.seeds:
                start = time.perf_counter()
                torch.manual_seed(seed)
                model = copy.deepcopy(fp_model)
                config = LotionConfig(bits=4, group_size=32, method=method, scale_dtype="float16")
                train(prepare(model, config), train_data, args.qat_steps, args.qat_lr, seed=seed)
                path = hf_lotion.export_gguf(model, os.path.join(scratch, f"{method}-{seed}.gguf"))
                layers = dict(hf_lotion.lotion_layers(model))
                exact_weights = gguf_weights(path, model)
                assert all(torch.equal(exact_weights[n], layers[n].deploy_weight()) for n in layers)
                row = {
                    "method": method,
                    "seed": seed,
                    "bits": 4,
                    "group_size": 32,
                    "qat_steps": args.qat_steps,
                    "qat_lr": args.qat_lr,
                    "fp": fp_loss,
                    "pretrain_curve": curve,
                    "fp_q4_0": fp_q4_0,
                    "qat_eval": eval_loss(model, evals),
                    "exact": eval_loss(with_weights(fp_model, exact_weights, model), evals),
                    "requant_latent": eval_loss(
                        with_weights(fp_model, {n: llama_q4_0(m.weight) for n, m in layers.items()}, model),
                        evals,
                    ),
                    "requant_eval": eval_loss(
                        with_weights(
                            fp_model, {n: llama_q4_0(m.deploy_weight()) for n, m in layers.items()}, model
                        ),
                        evals,
                    ),
                    "seconds": time.perf_counter() - start,
                }
                assert row["exact"] == row["qat_eval"], "the GGUF file must give the QAT model's eval loss"
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print_table(rows)


def print_table(rows) -> None:
    keys = ["exact", "requant_latent", "requant_eval", "fp_q4_0"]
    print(f"\nfp {rows[0]['fp']:.4f}; eval loss, mean +- std over seeds {sorted({r['seed'] for r in rows})}")
    print(
        "| method | (a) exact GGUF | (b) llama.cpp Q4_0 of latent | (b') Q4_0 of eval weights | (c) fp + Q4_0 |"
    )
    print("|---|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for key in keys:
            values = [r[key] for r in rows if r["method"] == method]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} +- {spread:.4f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
