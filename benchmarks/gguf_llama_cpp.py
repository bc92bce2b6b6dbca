"""One-off check with llama.cpp itself: a QAT GGUF export loads and scores like the PyTorch model.

Pretrains the tiny byte-level Llama of `gguf_compare.py` briefly, fine-tunes it at 4 bits (STE, group 32,
`scale_dtype="float16"`), exports it, and
compares the eval loss (perplexity) of PyTorch and of llama.cpp (through llama-cpp-python) on the same
held-out byte blocks, fed to both as token ids (the file has no vocabulary: `tokenizer=None`). llama.cpp's CPU Q4_0 matmul rounds the activations to Q8_0, so its figure is close to,
not equal to, PyTorch's.

    pip install llama-cpp-python   # builds llama.cpp from source, about 6 minutes on 2 cores
    OMP_WAIT_POLICY=PASSIVE python benchmarks/gguf_llama_cpp.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_compare import eval_loss, train

import hf_lotion
from hf_lotion import LotionConfig, prepare
from hf_lotion.trainer.recipes import byte_lm_splits, tiny_llama_config


def llama_cpp_loss(path: str, blocks: torch.Tensor) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=blocks.shape[1], logits_all=True, n_threads=2, verbose=False)
    losses = []
    for block in blocks.tolist():
        llm.reset()
        llm.eval(block)
        logits = np.asarray(llm.scores[: len(block) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        losses.append(-log_probs[np.arange(len(block) - 1), block[1:]].mean())
    llm.close()
    return float(statistics.fmean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--qat-steps", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/gguf_llama_cpp.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train_data, evals = byte_lm_splits(seq_len=128, eval_blocks=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    train(model, train_data, args.pretrain_steps, 3e-3, seed=1000)
    fp_loss = eval_loss(model, evals)
    prepare(model, LotionConfig(bits=4, group_size=32, method="ste", scale_dtype="float16"))
    train(model, train_data, args.qat_steps, 5e-4, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for unquantized in ("f32", "q8_0"):
            path = os.path.join(scratch, f"tiny-{unquantized}.gguf")
            hf_lotion.export_gguf(model, path, unquantized=unquantized)
            torch_loss = eval_loss(model, evals)
            cpp_loss = llama_cpp_loss(path, evals.blocks)
            row = {
                "model": "tiny byte-level Llama, 4-bit STE g32 fp16 scales",
                "unquantized": unquantized,
                "fp_loss": fp_loss,
                "pytorch_loss": torch_loss,
                "llama_cpp_loss": cpp_loss,
                "pytorch_ppl": math.exp(torch_loss),
                "llama_cpp_ppl": math.exp(cpp_loss),
                "file_bytes": os.path.getsize(path),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
