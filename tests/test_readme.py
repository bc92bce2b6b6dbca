"""The README's plain-PyTorch training loop runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {name}:start -->\s*```python\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_plain_loop_snippet_trains_lotion_and_evaluates_quantized():
    namespace: dict = {}
    exec(compile(readme_block("plain-loop"), str(README), "exec"), namespace)
    regularizer, model = namespace["regularizer"], namespace["model"]
    assert regularizer.active and regularizer.steps == 20 and regularizer.estimator.updates == 20
    assert not model.training
    quantized, latent = namespace["quantized_loss"].item(), namespace["latent_loss"].item()
    assert torch.isfinite(torch.tensor([quantized, latent])).all() and quantized != latent
    assert quantized < 5.0  # trained well below the uniform-over-bytes loss ln(256) = 5.55
