"""Two CPU processes (torchrun, gloo) train LOTION with plain `transformers.Trainer`: one step equals the
reference LOTION gradient over both ranks' batches, and both ranks end with identical weights and curvature."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from lotion_reference import reference_gradients
from safetensors.torch import load_file
from test_lotion_in_graph import LAMBDA, latent, lotion_model, relative_error

import hf_lotion

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("average_tokens", [True, False], ids=["global-token-count", "local-token-count"])
def test_ddp_step_is_the_reference_lotion_step_over_both_ranks(tmp_path, average_tokens):
    """Also with `average_tokens_across_devices=False` (each rank divides by its own tokens, DDP averages
    the gradients): the curvature must not come out short by the world size."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        WORKER, str(tmp_path), "true" if average_tokens else "false",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    state = {k for k in ranks[0] if not k.startswith("batch")}
    assert any(k.startswith("curvature.") for k in state)
    for key in state:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    batches = [
        {"input_ids": rank[f"batch{i}.input_ids"], "labels": rank[f"batch{i}.labels"]}
        for rank in ranks
        for i in range(2)
    ]
    assert sum(b["input_ids"].shape[0] for b in batches) == 16
    _, curvature, expected = reference_gradients(lotion_model(), batches, LAMBDA)
    before = latent(lotion_model())
    for name, _ in hf_lotion.lotion_layers(lotion_model()):
        update = before[name] - ranks[0][f"param.{name}.weight"]
        assert relative_error(update, expected[name]) < 1e-4, name
        # The curvature of the step, all-reduced over both ranks: EMA (1 - beta) * G.
        assert relative_error(ranks[0][f"curvature.{name}"] / (1 - 0.99), curvature[name]) < 1e-4, name
