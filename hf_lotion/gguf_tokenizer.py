"""The tokenizer metadata llama.cpp reads from a GGUF file (`tokenizer.ggml.*`), from a transformers tokenizer.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM, and the ones `tokenizers` trains with `ByteLevel`)
map to llama.cpp's "gpt2" model: the vocabulary strings and merges are written as they are (already in the
byte-to-unicode alphabet llama.cpp decodes), added tokens as CONTROL (special) or USER_DEFINED, and ids the
model has but the tokenizer lacks as UNUSED `[PAD<id>]` padding, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

KV = list[tuple[str, tuple[Any, ...]]]


def _components(node: dict | None, kind: str) -> list[dict]:
    """`node` (a tokenizer.json pre-tokenizer or decoder) and, for a Sequence, its members, of type `kind`."""
    if not node:
        return []
    members = node.get("pretokenizers") or node.get("decoders") or [node]
    return [member for member in members if member.get("type") == kind]


def _default_pre(arch: str, pre_tokenizer: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for `pre_tokenizer` (tokenizer.json), "default" when unknown."""
    if arch == "qwen2":
        return "qwen2"
    members = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    types = [member.get("type") for member in members]
    byte_level = _components(pre_tokenizer, "ByteLevel")
    if types == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return "gpt2"
    if types == ["Digits", "ByteLevel"] and members[0].get("individual_digits"):
        return "smollm"
    logger.warning(
        "Unknown pre-tokenizer %s: tokenizer.ggml.pre is written as 'default' (llama.cpp's default regex), which "
        "may split text differently; pass export_gguf(tokenizer_pre=...) with llama.cpp's name for it.",
        types,
    )
    return "default"


def tokenizer_metadata(model: Any, tokenizer: Any, arch: str, pre: str | None, gguf: Any) -> KV:
    """`(GGUFWriter method, args)` pairs for the tokenizer; raises ValueError for one llama.cpp cannot read."""
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    if tokenizer is None:
        logger.warning(
            "export_gguf() without a tokenizer: tokenizer.ggml.model is 'no_vocab', so llama.cpp runs the file "
            "on token ids only. Pass tokenizer= to include it."
        )
        return [("add_tokenizer_model", ("no_vocab",))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    bpe = data.get("model", {})
    if bpe.get("type") != "BPE" or not _components(data.get("pre_tokenizer"), "ByteLevel"):
        raise ValueError(
            f"export_gguf(tokenizer={type(tokenizer).__name__}) is not supported; allowed: a fast byte-level BPE "
            "tokenizer (tokenizers' BPE model with a ByteLevel pre-tokenizer), or tokenizer=None."
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(
            f"export_gguf(): the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
            f"{n_vocab} rows; allowed: a tokenizer whose ids all fit the model."
        )
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    normal, control, user, unused = (
        int(gguf.TokenType.NORMAL),
        int(gguf.TokenType.CONTROL),
        int(gguf.TokenType.USER_DEFINED),
        int(gguf.TokenType.UNUSED),
    )
    tokens = [f"[PAD{index}]" for index in range(n_vocab)]
    types = [unused] * n_vocab
    for text, index in vocab.items():
        tokens[index] = text
        token = added.get(index)
        types[index] = normal if token is None else (control if token.special else user)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in bpe.get("merges", [])]
    if not merges:
        # llama.cpp refuses a "gpt2" vocabulary without tokenizer.ggml.merges, and GGUF cannot store an empty list.
        raise ValueError(
            "export_gguf(tokenizer=...) got a BPE tokenizer without merges, which llama.cpp cannot load; allowed: "
            "a byte-level BPE tokenizer with merges, or tokenizer=None (llama.cpp then runs on token ids)."
        )
    kv: KV = [
        ("add_tokenizer_model", ("gpt2",)),
        ("add_tokenizer_pre", (pre or _default_pre(arch, data.get("pre_tokenizer")),)),
        ("add_token_list", (tokens,)),
        ("add_token_types", (types,)),
        ("add_token_merges", (merges,)),
    ]
    config = model.config
    for kind in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{kind}_token_id", None)
        if index is None:
            index = getattr(config, f"{kind}_token_id", None)
        if isinstance(index, list):
            index = index[0] if index else None
        if index is not None and 0 <= int(index) < n_vocab:
            kv.append((f"add_{kind}_token_id", (int(index),)))
    for flag in ("add_bos_token", "add_eos_token"):
        value = getattr(tokenizer, flag, None)
        if isinstance(value, bool):
            kv.append((f"add_{flag}", (value,)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        kv.append(("add_chat_template", (template,)))
    return kv
