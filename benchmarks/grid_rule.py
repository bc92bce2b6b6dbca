"""Which absmax rule (restricted or full-range) reconstructs weights better, per bit width and group size.

Relative MSE of RTN on synthetic Gaussian and heavy-tailed (Student-t, 4 dof) 1024x1024 weights.
Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/grid_rule.py
"""

from __future__ import annotations

import torch

from hf_lotion.quant import absmax_scales, fake_quantize_rtn


def relative_mse(weight: torch.Tensor, bits: int, group_size: int, grid: str) -> float:
    w_hat = fake_quantize_rtn(weight, absmax_scales(weight, bits, group_size, grid), bits, group_size)
    return ((w_hat - weight) ** 2).mean().item() / (weight**2).mean().item()


def main() -> None:
    torch.manual_seed(0)
    weights = {
        "gaussian": torch.randn(1024, 1024),
        "student-t(4)": torch.distributions.StudentT(4.0).sample((1024, 1024)),
    }
    print(f"{'weights':<13} {'group':>5} {'bits':>4} {'restricted':>11} {'full':>9} {'full/restr':>10}")
    for name, weight in weights.items():
        for group_size in (32, 128):
            for bits in (2, 3, 4, 8):
                restricted = relative_mse(weight, bits, group_size, "restricted")
                full = relative_mse(weight, bits, group_size, "full")
                print(
                    f"{name:<13} {group_size:>5} {bits:>4} {restricted:>11.5f} {full:>9.5f} {full / restricted:>10.3f}"
                )


if __name__ == "__main__":
    main()
