"""One LOTION optimizer step in each training loop against the independent float64 reference.

Runs the loops of `tests/lotion_paths.py` (the same ones the tests assert on) and prints, per loop, the
largest relative error of the applied update against `grad L + (lambda/2) G s (1 - 2p)` over all quantized
layers, and the penalty's share of the update:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lotion_paths.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from lotion_paths import PATHS
from lotion_reference import reference_gradients
from test_lotion_in_graph import LAMBDA, latent, lotion_model, relative_error, token_ids
from transformers.utils import logging as hf_logging

import hf_lotion


def main() -> None:
    hf_logging.set_verbosity_error()
    print(
        f"| loop (2-bit, group 32, lambda {LAMBDA:g}, 16 x 16 tokens) | max relative error | penalty / update |"
    )
    print("|---|---|---|")
    for name, run in PATHS.items():
        model = lotion_model()
        before = latent(model)
        seen = run(model, token_ids())
        loss_grads, _, expected = reference_gradients(lotion_model(), seen, LAMBDA)
        errors, shares = [], []
        for layer_name, layer in hf_lotion.lotion_layers(model):
            update = before[layer_name] - layer.weight.detach()
            errors.append(relative_error(update, expected[layer_name]))
            penalty = expected[layer_name] - loss_grads[layer_name]
            shares.append(float(penalty.norm() / expected[layer_name].norm()))
        print(f"| {name} | {max(errors):.1e} | {min(shares):.2f} - {max(shares):.2f} |")


if __name__ == "__main__":
    main()
