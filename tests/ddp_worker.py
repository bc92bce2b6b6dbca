"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: one LOTION step with plain `transformers.Trainer`.

Arguments: the output folder, and `true`/`false` for `TrainingArguments.average_tokens_across_devices`.

Each rank writes its weights after the step, its curvature state and the batches it trained on to
`<out>/rank<r>.safetensors`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

import hf_lotion

sys.path.insert(0, os.path.dirname(__file__))
from lotion_paths import record_batches, training_kwargs
from test_lotion_in_graph import lotion_model, token_ids

from hf_lotion.trainer.recipes import CausalLMBlocks


def main(out: str, average_tokens_across_devices: bool) -> None:
    torch.set_num_threads(1)
    model = lotion_model()
    seen, _ = record_batches(model)
    # 2 ranks x 2 micro-batches x 4 = the 16 examples of one step
    args = TrainingArguments(
        **(
            training_kwargs(out)
            | {
                "gradient_accumulation_steps": 2,
                "ddp_backend": "gloo",
                "average_tokens_across_devices": average_tokens_across_devices,
            }
        )
    )
    trainer = Trainer(model=model, args=args, train_dataset=CausalLMBlocks(token_ids()))
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    runtime = hf_lotion.penalty_runtime(model)
    tensors |= {f"curvature.{n}": t.contiguous() for n, t in runtime.ema.items()}
    tensors |= {f"batch{i}.input_ids": b["input_ids"].contiguous() for i, b in enumerate(seen)}
    tensors |= {f"batch{i}.labels": b["labels"].contiguous() for i, b in enumerate(seen)}
    save_file(tensors, os.path.join(out, f"rank{trainer.args.process_index}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "true")
