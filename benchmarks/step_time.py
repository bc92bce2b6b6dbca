"""CPU training step time of each QAT method against full-precision training, same tiny Llama, one process.

Methods run interleaved, several rounds, and the median seconds per optimizer step is reported with its
ratio to full precision (a plain `transformers.Trainer` on the unquantized model):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/step_time.py --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_lotion
from hf_lotion.trainer import LotionTrainer
from hf_lotion.trainer.recipes import byte_lm_splits, tiny_llama_config

VARIANTS = {
    "full precision (Trainer)": None,
    "full_precision": {"method": "full_precision"},
    "ste": {"method": "ste"},
    "stableqat": {"method": "stableqat"},
    "lotion (curvature every step)": {"method": "lotion", "curvature_every": 1},
    "lotion (curvature every 4)": {"method": "lotion", "curvature_every": 4},
    "lotion (curvature every 16)": {"method": "lotion", "curvature_every": 16},
}


def seconds_per_step(options, steps: int, bits: int, train) -> float:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    if options is not None:
        hf_lotion.prepare(model, hf_lotion.LotionConfig(bits=bits, group_size=32, **options))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=2e-3,
            logging_steps=steps,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer_cls = Trainer if options is None else LotionTrainer
        trainer = trainer_cls(model=model, args=args, train_dataset=train)
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    train, _ = byte_lm_splits(seq_len=128)
    names = ["full precision (Trainer)", *(name for name in args.variants if VARIANTS[name] is not None)]
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            times[name].append(seconds_per_step(VARIANTS[name], args.steps, args.bits, train))
    base = statistics.median(times["full precision (Trainer)"])
    print(f"| method ({args.bits}-bit, group 32) | s/step (median of {args.rounds}) | vs full precision |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.4f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
