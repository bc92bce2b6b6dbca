"""Quantized eval loss of RTN / STE / StableQAT / LOTION on a tiny byte-level Llama (CPU, offline).

Every method starts from the same random init and trains for the same steps on the embedded corpus with
`LotionTrainer`; `full_precision` trains in full precision (its latent loss is the fp baseline) and is
rounded at the end. Several seeds and a small learning-rate sweep per method, because a damped surrogate gradient
partly acts like a smaller learning rate (DESIGN section 11).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/qat_methods.py --bits 2 3 4 --seeds 0 1 2 --lrs 1e-3 2e-3 4e-3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers.utils import logging as hf_logging

from hf_lotion.trainer.recipes import train_tiny_byte_llama


def run(method, bits, seed, lr, steps, group_size=32, overrides=None):
    metrics = train_tiny_byte_llama(
        method,
        bits,
        seed=seed,
        learning_rate=lr,
        max_steps=steps,
        group_size=group_size,
        **(overrides or {}),
    )
    return {
        "method": method,
        "bits": bits,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "eval_loss": metrics["eval_loss"],
        "latent_loss": metrics["eval_latent_loss"],
        "train_s": metrics["train_seconds"],
        "s_per_step": metrics["train_seconds"] / steps,
        **({"overrides": overrides} if overrides else {}),
    }


def _accepted(method: str, options: dict) -> dict:
    """The overrides `method` takes: common LotionConfig fields and its own options."""
    from hf_lotion.config import COMMON_FIELDS
    from hf_lotion.methods import method_class

    allowed = {*COMMON_FIELDS, *method_class(method).option_names()}
    return {key: value for key, value in options.items() if key in allowed}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=["full_precision", "ste", "stableqat", "lotion"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument(
        "--lotion", type=json.loads, default=None, help="LotionConfig overrides for lotion, JSON"
    )
    parser.add_argument(
        "--options",
        type=json.loads,
        default=None,
        help="LotionConfig overrides, every method that takes them",
    )
    parser.add_argument("--out", default="qat_methods.jsonl")
    parser.add_argument("--summarize", nargs="+", metavar="JSONL", help="only print the tables of saved runs")
    args = parser.parse_args()
    if args.summarize:
        saved = []
        for path in args.summarize:
            with open(path) as handle:
                saved += [json.loads(line) for line in handle if line.strip()]
        print(summary_table(saved) + "\n\n" + best_lr_table(saved))
        return
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    results = []
    with open(args.out, "a") as sink:
        for bits in args.bits:
            for method in args.methods:
                for lr in args.lrs:
                    for seed in args.seeds:
                        overrides = _accepted(method, args.options or {}) | (
                            (args.lotion or {}) if method == "lotion" else {}
                        )
                        result = run(
                            method,
                            bits,
                            seed,
                            lr,
                            args.steps,
                            args.group_size,
                            overrides=overrides or None,
                        )
                        results.append(result)
                        sink.write(json.dumps(result) + "\n")
                        sink.flush()
                        print(json.dumps(result), flush=True)
    print(summary_table(results) + "\n\n" + best_lr_table(results))


def variant(result: dict) -> str:
    overrides = result.get("overrides")
    return result["method"] + (" " + json.dumps(overrides, sort_keys=True) if overrides else "")


def best_lr_table(results: list[dict]) -> str:
    """Markdown: per (bits, method) the learning rate with the lowest mean quantized eval loss."""
    groups: dict[tuple, dict[float, list[float]]] = {}
    latent: dict[tuple, list[float]] = {}
    for r in results:
        key = (r["bits"], variant(r))
        groups.setdefault(key, {}).setdefault(r["lr"], []).append(r["eval_loss"])
        latent.setdefault((*key, r["lr"]), []).append(r["latent_loss"])
    lines = [
        "| bits | method | best lr | quantized eval loss, mean ± sd (min-max) | latent | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for (bits, name), by_lr in sorted(groups.items()):
        lr, losses = min(by_lr.items(), key=lambda item: statistics.mean(item[1]))
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        lines.append(
            f"| {bits} | {name} | {lr:g} | {statistics.mean(losses):.3f} ± {sd:.3f} "
            f"({min(losses):.3f}-{max(losses):.3f}) | {statistics.mean(latent[(bits, name, lr)]):.3f} | {len(losses)} |"
        )
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    """Markdown: per (bits, method, lr) the mean and spread of the quantized eval loss over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["bits"], variant(r), r["lr"]), []).append(r)
    lines = [
        "| bits | method | lr | quantized eval loss (mean ± sd) | latent loss | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for (bits, method, lr), rs in sorted(groups.items()):
        losses = [r["eval_loss"] for r in rs]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        latent = statistics.mean(r["latent_loss"] for r in rs)
        lines.append(
            f"| {bits} | {method} | {lr:g} | {statistics.mean(losses):.4f} ± {sd:.4f} | {latent:.4f} | {len(rs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
