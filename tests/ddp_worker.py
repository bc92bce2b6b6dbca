"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: a few LotionTrainer steps on CPU/gloo.

Each rank writes its final weights and curvature state to `<out>/rank<r>.safetensors`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_lotion
from hf_lotion.trainer import LotionTrainer
from hf_lotion.trainer.recipes import CausalLMBlocks

sys.path.insert(0, os.path.dirname(__file__))
from conftest import VOCAB, tiny_config


def main(out: str, curvature: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    config = hf_lotion.LotionConfig(
        bits=2, group_size=32, method="lotion", curvature=curvature, curvature_every=2
    )
    hf_lotion.prepare(model, config)
    data = CausalLMBlocks(torch.randint(0, VOCAB, (64, 16), generator=torch.Generator().manual_seed(0)))
    args = TrainingArguments(
        out,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        seed=0,
    )
    trainer = LotionTrainer(model=model, args=args, train_dataset=data)
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    state = trainer.lotion_regularizer.state_dict()
    tensors |= {f"curvature.{n}": t.contiguous() for n, t in state["curvature"]["ema"].items()}
    save_file(tensors, os.path.join(out, f"rank{trainer.args.process_index}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
