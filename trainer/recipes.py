"""Small, offline training recipes: an embedded corpus, byte-level LM data and a tiny Llama.

Used by the tests, the benchmarks and `hf-lotion train`'s default run; nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def corpus_text() -> str:
    """The embedded corpus: CPython's `pydoc_data` help topics (about 0.7 MB of English and code)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def byte_blocks(text: str, seq_len: int) -> torch.Tensor:
    """`text` as UTF-8 bytes cut into `(n, seq_len)` int64 blocks (the tail that does not fill one is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} is not supported; allowed: an integer >= 2.")
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    n = data.numel() // seq_len
    if n == 0:
        raise ValueError(f"The text has {data.numel()} bytes, fewer than one block of seq_len={seq_len}.")
    return data[: n * seq_len].view(n, seq_len)


class CausalLMBlocks(Dataset):
    """Fixed-length token blocks as causal-LM examples (`labels` are the inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids}


def byte_lm_splits(
    text: str | None = None, seq_len: int = 128, eval_blocks: int = 64, seed: int = 0
) -> tuple[CausalLMBlocks, CausalLMBlocks]:
    """Train and eval splits of byte-level blocks of `text` (default: the embedded corpus), shuffled once."""
    blocks = byte_blocks(corpus_text() if text is None else text, seq_len)
    if blocks.shape[0] <= eval_blocks:
        raise ValueError(
            f"eval_blocks={eval_blocks} leaves no training data ({blocks.shape[0]} blocks in all)."
        )
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    blocks = blocks[order]
    return CausalLMBlocks(blocks[eval_blocks:]), CausalLMBlocks(blocks[:eval_blocks])


def tiny_llama_config(
    vocab_size: int = 256,
    hidden_size: int = 128,
    intermediate_size: int = 384,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 512,
):
    """A small Llama config whose linear layers all have in_features divisible by 32 (and 128)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )


def train_tiny_byte_llama(
    method: str,
    bits: int,
    seed: int = 0,
    learning_rate: float = 2e-3,
    max_steps: int = 300,
    group_size: int = 32,
    batch_size: int = 16,
    seq_len: int = 128,
    output_dir: str | None = None,
    **lotion_options,
) -> dict[str, float]:
    """Train a tiny byte-level Llama from a seeded random init on the embedded corpus with one QAT method.

    `method="full_precision"` trains in full precision and rounds at the end (`eval_latent_loss` is then the fp
    model's loss). Returns `LotionTrainer.evaluate()`'s metrics plus `train_seconds`. The same seed gives
    every method the same init and data order, so methods compare at an equal budget.

    Example:
        >>> train_tiny_byte_llama("lotion", bits=4, max_steps=20)["eval_loss"]  # doctest: +SKIP
        3.1
    """
    import tempfile
    import time

    from transformers import LlamaForCausalLM, TrainingArguments

    from hf_lotion.config import LotionConfig
    from hf_lotion.quantizer import prepare

    from .trainer import LotionTrainer

    train, evals = byte_lm_splits(seq_len=seq_len, eval_blocks=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    prepare(model, LotionConfig(bits=bits, group_size=group_size, method=method, **lotion_options))
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir or scratch,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=32,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, max_steps // 20),
            weight_decay=0.0,
            logging_steps=max(1, max_steps // 5),
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = LotionTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate()
    return {**metrics, "train_seconds": seconds}
