"""compressed-tensors export: loads without hf_lotion, replaces a folder atomically, warns where vLLM won't serve."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers.modeling_utils
from test_packed_checkpoints import qat_model
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_lotion

pytest.importorskip("compressed_tensors")

SHARDED = "20KB"  # splits the tiny llama into several shards


def converted(path, bits, group_size):
    model = qat_model(path, bits=bits, group_size=group_size, method="ste")
    hf_lotion.convert(model)
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A tiny llama whose in_features (128, 256) fit group sizes 64 and 128."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("wide-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def test_compressed_tensors_export_loads_without_hf_lotion(tiny_checkpoint, input_ids, tmp_path):
    model = converted(tiny_checkpoint("llama"), bits=4, group_size=32)
    expected = logits(model, input_ids)
    out = hf_lotion.export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert model.config.quantization_config.format == "packed" and model.hf_quantizer is not None  # restored
    torch.save(input_ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        assert "hf_lotion" not in sys.modules
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "ct.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # compressed-tensors dequantizes to dense s * q, the same single rounding as ours: exact equality.
    assert torch.equal(torch.load(tmp_path / "ct.pt"), expected)


@pytest.mark.parametrize(
    "bits,group_size", [(3, 16), (2, -1), (8, 32)], ids=["3bit-g16", "2bit-per-row", "8bit-g32"]
)
def test_settings_vllm_does_not_serve_still_load_bit_exact(
    bits, group_size, tiny_checkpoint, input_ids, tmp_path
):
    model = converted(tiny_checkpoint("llama"), bits, group_size)
    out = hf_lotion.export_compressed_tensors(model, tmp_path / "ct")
    assert torch.equal(
        logits(AutoModelForCausalLM.from_pretrained(out).eval(), input_ids), logits(model, input_ids)
    )


@pytest.mark.parametrize(
    "first,second", [(None, SHARDED), (SHARDED, None)], ids=["single-then-sharded", "sharded-then-single"]
)
def test_export_replaces_the_previous_export_entirely(first, second, tiny_checkpoint, input_ids, tmp_path):
    # Two different models, so that loading a stale file would show in the logits.
    old = converted(tiny_checkpoint("llama"), bits=4, group_size=32)
    new = converted(tiny_checkpoint("llama"), bits=8, group_size=-1)
    assert not torch.equal(logits(old, input_ids), logits(new, input_ids))
    size = {None: "5GB", SHARDED: SHARDED}
    hf_lotion.export_compressed_tensors(old, tmp_path / "out", max_shard_size=size[first])
    hf_lotion.export_compressed_tensors(new, tmp_path / "out", max_shard_size=size[second])
    hf_lotion.export_compressed_tensors(new, tmp_path / "fresh", max_shard_size=size[second])

    # Exactly the files (and bytes) of an export into a new folder: no stale model.safetensors or shards.
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "fresh")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == (second == SHARDED)
    assert sorted(os.listdir(tmp_path)) == ["fresh", "out"]  # no staging or backup folder left
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(reloaded, input_ids), logits(new, input_ids))


def fail_second_shard(real):
    """`safe_save_file` that writes the first shard, then half of the second, then fails as a full disk."""
    calls = []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)
        if len(calls) == 2:
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(28, "No space left on device")

    return save


def fail_second_move(real, root):
    """`os.rename` / `os.replace` that fails once, at the second move under `root`."""
    calls = []

    def move(src, dst, *args, **kwargs):
        if str(src).startswith(str(root)):
            calls.append((src, dst))
            if len(calls) == 2:
                raise OSError(5, "Input/output error")
        return real(src, dst, *args, **kwargs)

    return move


@pytest.mark.parametrize("failure", ["while-writing-shards", "while-moving-into-place"])
def test_failed_export_leaves_the_previous_export_untouched(failure, tiny_checkpoint, monkeypatch, tmp_path):
    out = tmp_path / "out"
    hf_lotion.export_compressed_tensors(converted(tiny_checkpoint("llama"), bits=4, group_size=32), out)
    before, listing = snapshot(out), sorted(os.listdir(tmp_path))
    if failure == "while-writing-shards":
        monkeypatch.setattr(
            transformers.modeling_utils,
            "safe_save_file",
            fail_second_shard(transformers.modeling_utils.safe_save_file),
        )
    else:
        monkeypatch.setattr(os, "rename", fail_second_move(os.rename, tmp_path))
        monkeypatch.setattr(os, "replace", fail_second_move(os.replace, tmp_path))
    model = converted(tiny_checkpoint("llama"), bits=8, group_size=-1)
    with pytest.raises(OSError, match=r"No space left|Input/output error"):
        hf_lotion.export_compressed_tensors(model, out, max_shard_size=SHARDED)
    monkeypatch.undo()
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == listing  # no staging or backup folder left
    assert model.config.quantization_config.format == "packed" and model.hf_quantizer is not None


@pytest.mark.parametrize(
    "kind", ["file", "folder-without-config", "symlink", "trainer-output-dir", "other-models-checkpoint"]
)
def test_export_refuses_targets_that_are_not_checkpoints(kind, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep me")
    elif kind == "folder-without-config":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif kind == "trainer-output-dir":  # trainer.save_model(output_dir) beside checkpoint-*/ folders
        shutil.copytree(tiny_checkpoint("llama"), out)
        (out / "checkpoint-500").mkdir()
        (out / "checkpoint-500" / "optimizer.pt").write_text("keep me")
    elif kind == "other-models-checkpoint":  # a config.json, but not of an earlier export
        shutil.copytree(tiny_checkpoint("llama"), out)
    else:
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real", target_is_directory=True)
    before, listing = snapshot(tmp_path), sorted(os.listdir(tmp_path))
    model = converted(tiny_checkpoint("llama"), bits=4, group_size=32)
    with pytest.raises(ValueError, match=rf"save_directory '{re.escape(str(out))}' .*allowed: a new path"):
        hf_lotion.export_compressed_tensors(model, out)
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == listing


def test_export_refuses_the_working_directory(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    model = converted(tiny_checkpoint("llama"), bits=4, group_size=32)
    for target in (".", tmp_path.parent):
        with pytest.raises(ValueError, match=r"is the working directory or one above it"):
            hf_lotion.export_compressed_tensors(model, target)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.parametrize("kind", ["new-nested-path", "empty-folder"])
def test_export_accepts_new_paths_and_empty_folders(kind, tiny_checkpoint, tmp_path):
    out = tmp_path / "a" / "b" if kind == "new-nested-path" else tmp_path / "out"
    if kind == "empty-folder":
        out.mkdir()
    model = converted(tiny_checkpoint("llama"), bits=4, group_size=32)
    assert hf_lotion.export_compressed_tensors(model, out) == out
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_export_folder_gets_the_permissions_of_a_plain_mkdir(tiny_checkpoint, tmp_path):
    # A private (0700) folder would stop a server running as another user from reading the export.
    (tmp_path / "plain").mkdir()
    out = hf_lotion.export_compressed_tensors(converted(tiny_checkpoint("llama"), 4, 32), tmp_path / "out")
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode


def exports_warnings(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hf_lotion.exports" and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize(
    "bits,group_size,named,not_named",
    [
        (3, 32, ["num_bits=3", "vLLM serves num_bits 4, 8"], "group_size="),
        (4, 16, ["group_size=16", "vLLM serves group_size -1 (per channel), 32, 64, 128"], "num_bits="),
        (2, 16, ["num_bits=2", "group_size=16"], None),
    ],
    ids=["3bit-g32", "4bit-g16", "2bit-g16"],
)
def test_export_warns_which_setting_vllm_will_not_serve(
    bits, group_size, named, not_named, tiny_checkpoint, caplog, tmp_path
):
    caplog.set_level(logging.WARNING, logger="hf_lotion.exports")
    hf_lotion.export_compressed_tensors(
        converted(tiny_checkpoint("llama"), bits, group_size), tmp_path / "ct"
    )
    (message,) = exports_warnings(caplog)
    assert "vLLM" in message and all(text in message for text in named), message
    assert not_named is None or not_named not in message, message


@pytest.mark.parametrize(
    "bits,group_size",
    [(4, 32), (4, 64), (4, 128), (4, -1), (8, 128)],
    ids=["4bit-g32", "4bit-g64", "4bit-g128", "4bit-per-row", "8bit-g128"],
)
def test_export_does_not_warn_for_settings_vllm_serves(bits, group_size, wide_checkpoint, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="hf_lotion.exports")
    hf_lotion.export_compressed_tensors(converted(wide_checkpoint, bits, group_size), tmp_path / "ct")
    assert exports_warnings(caplog) == []
