"""Packed checkpoints on CPU: size on disk vs bf16, and `generate` tokens/s of packed vs bf16 models.

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/packed_cpu.py
The 1B-class figure is computed from the Llama-3.2-1B layout (no weights needed) with the byte counts
of the packed format: bits/8 per weight, one compute-dtype scale per group, an int64 shape per layer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_lotion
from hf_lotion.quant import packed_words


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def layout_ratio(config: LlamaConfig, bits: int, group_size: int) -> tuple[float, float]:
    """(quantized layers, whole checkpoint) packed/bf16 byte ratio for a Llama layout with a tied head."""
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * config.num_hidden_layers
    dense = sum(o * n * 2 for o, n in shapes)
    packed = sum(o * packed_words(n, bits) * 4 + o * (n // group_size) * 2 + 16 for o, n in shapes)
    other = config.vocab_size * h * 2 + (2 * config.num_hidden_layers + 1) * h * 2  # embedding (tied) + norms
    return packed / dense, (packed + other) / (dense + other)


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp / "bf16")
        bf16 = AutoModelForCausalLM.from_pretrained(tmp / "bf16").eval()
        qat = AutoModelForCausalLM.from_pretrained(
            tmp / "bf16",
            quantization_config=hf_lotion.LotionConfig(bits=args.bits, group_size=args.group_size),
        )
        hf_lotion.convert(qat).save_pretrained(tmp / "packed")
        packed = AutoModelForCausalLM.from_pretrained(tmp / "packed").eval()
        whole = folder_bytes(tmp / "packed") / folder_bytes(tmp / "bf16")
        print(
            f"tiny model ({sum(p.numel() for p in bf16.parameters()) / 1e6:.1f}M params, untied head in bf16): "
            f"packed/bf16 checkpoint bytes = {whole:.3f}"
        )
        layers, total = layout_ratio(
            LlamaConfig(
                vocab_size=128256,
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=64,
            ),
            args.bits,
            args.group_size,
        )
        print(
            f"Llama-3.2-1B layout, {args.bits}-bit g{args.group_size}: quantized layers {layers:.4f} of bf16 "
            f"(ideal {args.bits / 16 + 2 / args.group_size / 2:.4f}), whole checkpoint {total:.3f}"
        )
        prompt = torch.randint(0, config.vocab_size, (1, 16))
        for name, model in [("bf16", bf16), ("packed", packed), ("bf16", bf16), ("packed", packed)]:
            print(
                f"generate batch 1, {args.new_tokens} tokens, {name:>6}: "
                f"{tokens_per_second(model, prompt, args.new_tokens, args.repeats):7.1f} tokens/s"
            )


if __name__ == "__main__":
    main()
