"""GGUF export: quantized layers written exactly (read back with gguf-py), metadata, tokenizer, refusals, CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import build_tiny_model
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import hf_lotion
from hf_lotion import LotionConfig, prepare
from hf_lotion.quant.gguf_blocks import q4_0_blocks, q8_0_blocks, tq2_0_blocks

gguf = pytest.importorskip("gguf")

# GGUF tensor names of llama.cpp's llama/qwen2 architectures -> transformers names, written out by hand.
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name: str) -> str:
    stem, suffix = name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, block, kind = stem.split(".")
        return f"model.layers.{block}.{BLOCK_NAMES[kind]}.{suffix}"
    return f"{GLOBAL_NAMES[stem]}.{suffix}"


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (rows 2j, 2j+1 of a head back to j, j + d/2)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path, config) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors dequantized by gguf-py, under transformers names, in HF row order; and their types."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tensors, types = {}, {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(*reversed(tensor.shape.tolist()))
        name = hf_name(tensor.name)
        if arch == "llama" and ".attn_q." in tensor.name:
            w = unpermute(w, heads)
        elif arch == "llama" and ".attn_k." in tensor.name:
            w = unpermute(w, kv_heads)
        tensors[name], types[name] = w, tensor.tensor_type.name
    return tensors, types


def field(reader, key):
    return reader.fields[key].contents()


def wide_model(arch="llama", seed=0, vocab=96, tie=False, dtype=torch.float32, hidden=128):
    """A tiny model whose in_features (128, 256) fit group sizes 32, 64 and 128 (`hidden=256`: and 256)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
    )
    if arch == "mistral":
        config = MistralConfig(sliding_window=None, **common)
    elif arch == "llama-bias":  # q/k biases are permuted with their rows
        config = LlamaConfig(attention_bias=True, **common)
    else:
        config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # groups of visibly different scales, as conftest's models
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.empty_like(p).uniform_(0.5, 4.0))
            else:
                p.add_(torch.randn_like(p) * 0.1)  # norms and biases that are not all ones / zeros
    return model.to(dtype)


def quantized(model, **config):
    config = {"method": "ste", "scale_dtype": "float16"} | config
    return prepare(model, LotionConfig(**config)).eval()


def eval_weights(model) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": layer.deploy_weight() for name, layer in hf_lotion.lotion_layers(model)}


# -- the block layout, checked against bytes built by hand from the format's description -----------------------


def test_q4_0_block_bytes_match_the_format():
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7] + [7, 0, -8, 3] * 4])
    blocks = q4_0_blocks(q, torch.tensor([[0.375]]), group_size=32)
    # d = 0.375 in fp16 is 0x3600 (little-endian 00 36); byte j = (q[j] + 8) | (q[j + 16] + 8) << 4.
    expected = bytes([0x00, 0x36]) + bytes(
        (q[0, j].item() + 8) | ((q[0, j + 16].item() + 8) << 4) for j in range(16)
    )
    assert blocks.tobytes() == expected
    assert expected[2:6] == bytes([0xF0, 0x81, 0x02, 0xB3])  # (0|15<<4), (1|8<<4), (2|0<<4), (3|11<<4)
    dequantized = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(dequantized, (q.float() * 0.375).numpy())


def test_q8_0_block_bytes_match_the_format():
    q = torch.tensor([[-128, 127, 0, -1] * 8, [5, -5, 64, -64] * 8])
    blocks = q8_0_blocks(q, torch.tensor([[0.5], [2.0**-20]]), group_size=-1)
    assert blocks[0].tobytes() == bytes([0x00, 0x38]) + bytes([0x80, 0x7F, 0x00, 0xFF] * 8)
    assert blocks[1, :2].tobytes() == bytes([0x10, 0x00])  # 2**-20: an fp16 subnormal, 16 * 2**-24
    dequantized = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(dequantized, (q.float() * torch.tensor([[0.5], [2.0**-20]])).numpy())


def test_tq2_0_block_bytes_match_the_format():
    q = torch.tensor([[-1, 0, 1, 1] * 64])
    blocks = tq2_0_blocks(q, torch.tensor([[0.375]]), group_size=-1)
    # Byte j of half h holds elements h*128 + k*32 + j (k = 0..3) as q + 1 at bits 2k; then d (00 36).
    u = (q[0] + 1).tolist()
    expected = bytes(
        sum(u[h * 128 + k * 32 + j] << (2 * k) for k in range(4)) for h in range(2) for j in range(32)
    )
    assert blocks.tobytes() == expected + bytes([0x00, 0x36])
    assert expected[:4] == bytes([0x00, 0x55, 0xAA, 0xAA])  # 0 0 0 0, 1 1 1 1, 2 2 2 2, 2 2 2 2
    dequantized = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.TQ2_0)
    assert np.array_equal(dequantized, (q.float() * 0.375).numpy())


# -- exactness ---------------------------------------------------------------------------------------------


SETTINGS = [
    (4, 32, "full"),
    (4, 64, "full"),
    (4, 128, "restricted"),
    (4, -1, "full"),
    (8, 32, "restricted"),
    (8, 64, "full"),
    (8, 128, "full"),
    (8, -1, "restricted"),
    (3, 32, "full"),
    (2, 64, "restricted"),
]


@pytest.mark.parametrize(
    "bits,group_size,grid", SETTINGS, ids=[f"{b}bit-g{g}-{grid}" for b, g, grid in SETTINGS]
)
def test_every_quantized_tensor_dequantizes_to_the_eval_weights(bits, group_size, grid, tmp_path):
    model = quantized(wide_model(), bits=bits, group_size=group_size, grid=grid)
    path = hf_lotion.export_gguf(model, tmp_path / "m.gguf")
    tensors, types = read_gguf(path, model.config)
    expected = eval_weights(model)
    assert len(expected) == 14
    for name, weight in expected.items():
        assert types[name] == ("Q8_0" if bits == 8 else "Q4_0"), name
        assert torch.equal(tensors[name], weight), name
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary file left


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama-bias"])
def test_forward_of_the_dequantized_file_gives_the_eval_logits(arch, tmp_path):
    model = quantized(wide_model(arch), bits=4, group_size=32)
    path = hf_lotion.export_gguf(model, tmp_path / "m.gguf", unquantized="f32")
    tensors, types = read_gguf(path, model.config)
    assert types["model.embed_tokens.weight"] == types["lm_head.weight"] == "F32"
    if arch in ("qwen2", "llama-bias"):
        biases = {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias"}
        assert biases <= set(tensors)
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(tensors, strict=True)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_ternary_layers_as_tq2_0(tmp_path):
    model = quantized(wide_model(hidden=256), bits=2, group_size=256, grid="restricted")
    path = hf_lotion.export_gguf(model, tmp_path / "m.gguf", ternary="tq2_0", unquantized="f32")
    tensors, types = read_gguf(path, model.config)
    expected = eval_weights(model)
    assert {types[name] for name in expected} == {"TQ2_0"}
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == 37  # MOSTLY_TQ2_0
    for name, weight in expected.items():
        assert torch.equal(tensors[name], weight), name
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(tensors, strict=True)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    # The default keeps 2-bit layers in Q4_0.
    _, types = read_gguf(hf_lotion.export_gguf(model, tmp_path / "q4.gguf"), model.config)
    assert {types[name] for name in expected} == {"Q4_0"}


def test_bf16_model_file_holds_the_exact_products(tmp_path):
    model = quantized(wide_model(dtype=torch.bfloat16), bits=4, group_size=32)
    tensors, _ = read_gguf(hf_lotion.export_gguf(model, tmp_path / "m.gguf"), model.config)
    for name, layer in hf_lotion.lotion_layers(model):
        q, scales = layer.quantize_weight()
        exact = q.float() * scales.float().repeat_interleave(32, dim=1)  # fp16 d times q: exact in fp32
        assert torch.equal(tensors[f"{name}.weight"], exact), name
        assert torch.equal(tensors[f"{name}.weight"].to(torch.bfloat16), layer.deploy_weight()), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_converted_model_exports_the_same_file(arch, tmp_path):
    model = quantized(wide_model(arch), bits=4, group_size=64)
    hf_lotion.export_gguf(model, tmp_path / "qat.gguf")
    hf_lotion.convert(model)
    hf_lotion.export_gguf(model, tmp_path / "packed.gguf")
    assert (tmp_path / "qat.gguf").read_bytes() == (tmp_path / "packed.gguf").read_bytes()


def test_tied_embeddings_omit_the_output_tensor(tmp_path):
    model = quantized(wide_model(tie=True), bits=4, group_size=32)
    path = hf_lotion.export_gguf(model, tmp_path / "m.gguf", unquantized="f32")
    tensors, _ = read_gguf(path, model.config)
    assert "lm_head.weight" not in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)


@pytest.mark.parametrize("unquantized", ["f16", "q8_0"])
def test_unquantized_embedding_and_head_types(unquantized, tmp_path):
    model = quantized(wide_model(), bits=4, group_size=32)
    path = hf_lotion.export_gguf(model, tmp_path / "m.gguf", unquantized=unquantized)
    tensors, types = read_gguf(path, model.config)
    assert types["model.embed_tokens.weight"] == types["lm_head.weight"] == unquantized.upper()
    assert types["model.norm.weight"] == types["model.layers.0.input_layernorm.weight"] == "F32"
    head = model.lm_head.weight.detach().numpy()
    kind = gguf.GGMLQuantizationType[unquantized.upper()]
    expected = gguf.quants.dequantize(gguf.quants.quantize(head, kind), kind)  # llama.cpp's own rule
    assert np.array_equal(tensors["lm_head.weight"].numpy(), expected)


# -- metadata and tokenizer --------------------------------------------------------------------------------


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_metadata_and_tokenizer(arch, tmp_path):
    tokenizer = byte_level_tokenizer()
    model = quantized(wide_model(arch, vocab=320), bits=8, group_size=-1)
    path = hf_lotion.export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    c = model.config
    assert field(reader, "general.architecture") == arch
    expected = {
        "context_length": 256,
        "embedding_length": 128,
        "block_count": 2,
        "feed_forward_length": 256,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "rope.freq_base": 5000.0,
        "rope.dimension_count": 32,
        "vocab_size": 320,
    }
    for key, value in expected.items():
        assert field(reader, f"{arch}.{key}") == value, key
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert field(reader, "general.file_type") == 7  # MOSTLY_Q8_0
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == ("qwen2" if arch == "qwen2" else "gpt2")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == len(types) == 320
    assert all(tokens[i] == text for text, i in vocab.items())
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]" and types[len(vocab)] == 5  # UNUSED
    assert types[vocab["<|endoftext|>"]] == 3 and types[vocab["Ġthe"]] == 1  # CONTROL, NORMAL
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == len(vocab) - 256 - 2 and all(len(m.split(" ")) == 2 for m in merges)
    assert field(reader, "tokenizer.ggml.bos_token_id") == vocab["<|im_start|>"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == vocab["<|endoftext|>"]
    assert field(reader, "tokenizer.ggml.padding_token_id") == vocab["<|endoftext|>"]
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template


def test_tokenizer_without_merges_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.BPE(vocab={chr(0x100 + i): i for i in range(8)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match=r"without merges, which llama\.cpp cannot load"):
        hf_lotion.export_gguf(quantized(wide_model()), tmp_path / "m.gguf", tokenizer=tokenizer)
    assert os.listdir(tmp_path) == []


# -- refusals: nothing is written ----------------------------------------------------------------------------


def refused(tmp_path, model, match, path=None, **kwargs):
    with pytest.raises(ValueError, match=match):
        hf_lotion.export_gguf(model, path or tmp_path / "m.gguf", **kwargs)
    assert os.listdir(tmp_path) == [] or path is not None


@pytest.mark.parametrize(
    "case",
    [
        "architecture",
        "group-16",
        "per-row-80",
        "fp32-scales",
        "directory",
        "under-a-file",
        "unquantized",
        "ternary-full-grid",
        "ternary-group-128",
    ],
)
def test_bad_input_is_refused_before_anything_is_written(case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    if case == "architecture":
        model = prepare(build_tiny_model("gpt2"), LotionConfig(bits=4, group_size=32, scale_dtype="float16"))
        refused(out, model, r"model_type='gpt2'.*allowed: one of \('llama', 'mistral', 'qwen2'\)")
    elif case == "group-16":
        refused(out, quantized(wide_model(), bits=4, group_size=16), r"group_size=16 is not a multiple of 32")
    elif case == "per-row-80":
        config = LlamaConfig(
            vocab_size=96, hidden_size=80, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4
        )
        model = quantized(AutoModelForCausalLM.from_config(config), bits=4, group_size=-1)
        refused(out, model, r"group_size=-1 \(in_features=80\) is not a multiple of 32")
    elif case == "fp32-scales":
        model = prepare(wide_model(), LotionConfig(bits=4, group_size=32, method="ste")).eval()
        refused(out, model, r"not all fp16 values; train with LotionConfig\(scale_dtype='float16'\)")
    elif case == "directory":
        refused(out, quantized(wide_model(), bits=4, group_size=32), "is a directory", path=out)
        assert os.listdir(out) == []
    elif case == "under-a-file":
        (out / "file").write_text("x")
        model = quantized(wide_model(), bits=4, group_size=32)
        refused(out, model, "is not a writable directory", path=out / "file" / "m.gguf")
        assert os.listdir(out) == ["file"]
    elif case == "unquantized":
        refused(out, quantized(wide_model(), bits=4, group_size=32), r"allowed: one of", unquantized="q4_0")
    elif case == "ternary-full-grid":
        model = quantized(wide_model(hidden=256), bits=2, group_size=256, grid="full")
        refused(out, model, r"needs levels -1, 0, 1, but this 2-bit layer uses -2", ternary="tq2_0")
    elif case == "ternary-group-128":
        model = quantized(wide_model(), bits=2, group_size=128, grid="restricted")
        refused(out, model, r"group_size=128 is not a multiple of 256, the TQ2_0 block", ternary="tq2_0")


def test_missing_gguf_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"pip install 'hf-lotion\[gguf\]'"):
        hf_lotion.export_gguf(quantized(wide_model(), bits=4, group_size=32), tmp_path / "m.gguf")
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    model = quantized(wide_model(), bits=4, group_size=32)
    path = hf_lotion.export_gguf(model, tmp_path / "m.gguf")
    before = path.read_bytes()

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="No space"):
        hf_lotion.export_gguf(quantized(wide_model(seed=1), bits=8, group_size=32), path)
    assert os.listdir(tmp_path) == ["m.gguf"] and path.read_bytes() == before
    with pytest.raises(OSError, match="No space"):
        hf_lotion.export_gguf(model, tmp_path / "new" / "deeper" / "m.gguf")
    assert os.listdir(tmp_path) == ["m.gguf"]  # the folders made for the file are gone too


# -- CLI ---------------------------------------------------------------------------------------------------


def test_cli_exports_a_saved_model(tmp_path):
    model = quantized(wide_model(vocab=320), bits=4, group_size=32)
    model.save_pretrained(tmp_path / "model")
    byte_level_tokenizer().save_pretrained(tmp_path / "model")
    command = [
        sys.executable,
        "-m",
        "hf_lotion_cli",
        "export",
        str(tmp_path / "model"),
        str(tmp_path / "m.gguf"),
    ]
    result = subprocess.run(
        [*command, "--format", "gguf", "--unquantized", "f32"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tensors, _ = read_gguf(tmp_path / "m.gguf", model.config)
    for name, weight in eval_weights(model).items():
        assert torch.equal(tensors[name], weight), name
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.model"].contents() == "gpt2"
    result = subprocess.run([*command, "--unquantized", "q4_0"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'q4_0'" in result.stderr
