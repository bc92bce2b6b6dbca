"""The package installs with one import root: trainer/ and cards/ become hf_lotion.trainer / hf_lotion.cards.

Besides it, only the console script's module `hf_lotion_cli` is top level (so `hf-lotion --help` needs no torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = [
    "hf_lotion.quant",
    "hf_lotion.nn",
    "hf_lotion.kernels",
    "hf_lotion.kernels.fake_quant",
    "hf_lotion.kernels.packed_matmul",
    "hf_lotion.methods",
    "hf_lotion.trainer",
    "hf_lotion.cards",
    "hf_lotion.cli",
]


def test_installed_import_root():
    import hf_lotion.cards
    import hf_lotion.trainer

    assert Path(hf_lotion.trainer.__file__).parent.name == "trainer"
    assert Path(hf_lotion.cards.__file__).parent.name == "cards"
    for top_level in ("trainer", "cards"):
        assert top_level not in sys.modules, f"'{top_level}' must not be importable as a top-level package"


@pytest.mark.slow
def test_wheel_installs_and_imports_from_a_fresh_process(tmp_path):
    pytest.importorskip("setuptools")
    dist, site = tmp_path / "dist", tmp_path / "site"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(REPO),
    ]
    subprocess.run(build, check=True, cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("hf_lotion-*.whl")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, cwd=tmp_path, timeout=300)
    assert not (site / "trainer").exists() and not (site / "cards").exists()
    (dist_info,) = site.glob("hf_lotion-*.dist-info")
    assert "hf-lotion = hf_lotion_cli:main" in (dist_info / "entry_points.txt").read_text()

    code = "; ".join(
        [
            "import importlib, hf_lotion",
            *[f"importlib.import_module('{m}')" for m in SUBPACKAGES],
            "import hf_lotion.trainer, hf_lotion.cards, hf_lotion.trainer.recipes",
            "assert hf_lotion.LotionTrainer.__module__ == 'hf_lotion.trainer.trainer'",
            "import hf_lotion_cli",
            "print(hf_lotion.__file__); print(hf_lotion.trainer.__file__); print(hf_lotion.cards.__file__)",
            "print(hf_lotion_cli.__file__)",
            # the card template is package data, read when a card is built
            "import importlib.resources as r; assert r.files('hf_lotion.cards').joinpath('template.md').is_file()",
            "print(hf_lotion.LotionConfig(bits=4).bits)",
        ]
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    *files, bits = result.stdout.split()
    assert bits == "4"
    for file in files:
        assert Path(file).is_relative_to(site), f"{file} was not imported from the wheel"
