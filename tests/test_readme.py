"""The README's plain-PyTorch training loop runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import hf_lotion

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {name}:start -->\s*```python\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_plain_loop_snippet_trains_lotion_and_evaluates_quantized():
    namespace: dict = {}
    exec(compile(readme_block("plain-loop"), str(README), "exec"), namespace)
    model = namespace["model"]
    runtime = hf_lotion.penalty_runtime(model)
    assert runtime.step == 20 and runtime.updates == 5 and runtime.pop_penalty() > 0  # every 4 steps
    assert not model.training
    quantized, latent = namespace["quantized_loss"].item(), namespace["latent_loss"].item()
    assert torch.isfinite(torch.tensor([quantized, latent])).all() and quantized != latent
    assert quantized < 5.0  # trained well below the uniform-over-bytes loss ln(256) = 5.55


def test_add_method_snippet_registers_a_method_that_configs_accept():
    namespace: dict = {}
    exec(compile(readme_block("add-method"), str(README), "exec"), namespace)
    try:
        assert namespace["config"].method == "clipped_ste" and namespace["config"].clip_slope == 0.5
        surrogate = namespace["config"].build_method().surrogate()
        assert surrogate(torch.tensor([0.0, 0.5])).tolist() == [1.0, 0.75]
    finally:
        hf_lotion.unregister_method("clipped_ste")


def test_lora_snippet_trains_qat_adapters_and_merges_exactly():
    namespace: dict = {}
    exec(compile(readme_block("lora"), str(README), "exec"), namespace)  # it asserts the exact merge itself
    packed = namespace["packed"]
    assert any(isinstance(m, hf_lotion.PackedLinear) for m in packed.modules())
    assert not any("lora_" in name for name, _ in packed.named_parameters())
