"""QAT adapters must beat plain LoRA + rounding: 2-bit LoRA-QAT (StableQAT) against LoRA merged then RTN.

A tiny byte-level Llama is first trained in full precision (the way users start QAT-LoRA: from a pretrained
model), then both arms train LoRA adapters with the same init, data order, steps and learning rate, and are
evaluated as the packed model a user ships (merge_and_unload, then hf_lotion.convert). The full comparison,
with more arms, seeds and a learning-rate sweep, is benchmarks/lora_qat.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

import hf_lotion
from hf_lotion import LotionConfig
from hf_lotion.trainer.recipes import byte_lm_splits, tiny_llama_config

hf_logging.set_verbosity_error()

SEQ_LEN, BATCH = 64, 16
PRETRAIN = dict(steps=400, lr=5e-3)
LORA = dict(steps=60, lr=3e-3)
# Measured offline with this file's `run` (2 bits, group 32), seeds 0 / 1 / 2: float model (LoRA merged) 2.091 /
# 2.194 / 2.033; plain LoRA merged then RTN 2.149 / 2.242 / 2.093; StableQAT adapters merged + converted
# 2.103 / 2.198 / 2.044: margins 0.047 / 0.044 / 0.049, 81% / 90% / 82% of the rounding loss recovered.
# STE adapters: margins 0.034 / 0.033 / 0.035 (seeds 0-2), so StableQAT is the one tested.
# (This short pretraining is far from converged; benchmarks/lora_qat.py starts from a converged model.)
MARGIN, SHARE = 0.02, 0.5


def _train(model, blocks: torch.Tensor, steps: int, lr: float, seed: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    model.train()
    for step in range(steps):
        ids = blocks[order[(torch.arange(BATCH) + step * BATCH) % len(blocks)]]
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@torch.no_grad()
def _eval_loss(model, blocks: torch.Tensor) -> float:
    model.eval()
    return model(input_ids=blocks, labels=blocks).loss.item()


def _lora(model, seed: int):
    torch.manual_seed(seed)  # the same adapter init for both arms
    return get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    )


def run(seed: int = 0, method: str = "stableqat", bits: int = 2) -> dict[str, float]:
    """Eval losses of the float model, plain LoRA then RTN (a), and QAT-LoRA merged + converted."""
    train, evals = byte_lm_splits(seq_len=SEQ_LEN, eval_blocks=64)
    torch.manual_seed(seed)
    pretrained = _train(LlamaForCausalLM(tiny_llama_config()), train.blocks, seed=seed, **PRETRAIN)
    quantized = LotionConfig(bits=bits, group_size=32, method=method)
    rtn = LotionConfig(bits=bits, group_size=32, method="full_precision")

    plain = _train(_lora(copy.deepcopy(pretrained), seed), train.blocks, seed=seed + 1, **LORA)
    merged = plain.merge_and_unload()
    fp_loss = _eval_loss(merged, evals.blocks)
    rtn_loss = _eval_loss(hf_lotion.convert(hf_lotion.prepare(merged, rtn)), evals.blocks)

    qat = hf_lotion.prepare(copy.deepcopy(pretrained), quantized)
    qat = _train(_lora(qat, seed), train.blocks, seed=seed + 1, **LORA)
    qat_loss = _eval_loss(hf_lotion.convert(qat.merge_and_unload()), evals.blocks)
    return {"fp": fp_loss, "lora_then_rtn": rtn_loss, "qat_lora": qat_loss}


@pytest.mark.slow
def test_2bit_qat_lora_beats_lora_then_rtn_after_merge_and_convert():
    losses = run(seed=0)
    gap = losses["lora_then_rtn"] - losses["fp"]
    assert gap > 1.5 * MARGIN, losses  # the rounding loss that QAT-LoRA has to close is real ...
    # ... and the packed QAT-LoRA model closes most of it.
    assert losses["qat_lora"] < losses["lora_then_rtn"] - MARGIN, losses
    assert (losses["lora_then_rtn"] - losses["qat_lora"]) / gap > SHARE, losses
