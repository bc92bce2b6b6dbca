"""Shared fixtures: tiny transformers models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

# OpenMP spin-waiting makes small CPU runs on 2-core machines several times slower; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter, which must be chosen before anything
# imports triton (transformers and bitsandbytes may).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

import hf_lotion  # noqa: F401  (registers quant_method "lotion")

VOCAB = 96


def tiny_config(arch: str):
    """A tiny config whose linear layers have in_features divisible by 16 (and 32 where possible)."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **common)
    if arch == "mistral":
        return MistralConfig(
            hidden_size=64, intermediate_size=96, num_key_value_heads=2, sliding_window=None, **common
        )
    if arch == "opt":
        return OPTConfig(
            hidden_size=64, ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=64, **common
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB)
    raise ValueError(arch)


def build_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    # Spread the weights so that groups differ visibly in scale.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.empty_like(p).uniform_(0.5, 4.0))
    return model.to(dtype)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(arch, dtype)` -> directory of a saved tiny float model (built once per session)."""
    cache: dict[tuple[str, torch.dtype], str] = {}

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32) -> str:
        key = (arch, dtype)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}")
            build_tiny_model(arch, dtype=dtype).save_pretrained(path)
            cache[key] = str(path)
        return cache[key]

    return make


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
