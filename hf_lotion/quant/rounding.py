"""Randomized (stochastic) rounding, the noise model behind LOTION.

`RR(v)` rounds `v = n + p` (`n = floor(v)`, `p` in [0, 1)) up with probability `p`: it is unbiased,
leaves grid points fixed, and has variance `p (1 - p)` in units of the scale.
"""

from __future__ import annotations

import torch


def rounding_split(v: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(floor, p)` of `v` clamped to `[qmin, qmax]`: RR gives `floor + 1` with probability `p`."""
    v = v.clamp(qmin, qmax)
    lower = torch.floor(v)
    return lower, v - lower


def stochastic_round(
    v: torch.Tensor,
    qmin: int,
    qmax: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Unbiased randomized rounding of `v` (already divided by the scale) to integers in `[qmin, qmax]`.

    Pass a `generator` or a `seed` to make the draw reproducible.

    Example:
        >>> stochastic_round(torch.tensor([0.25, 2.0]), -8, 7, seed=0)
        tensor([0., 2.])
    """
    if generator is not None and seed is not None:
        raise ValueError("stochastic_round takes a generator or a seed, not both.")
    if seed is not None:
        generator = torch.Generator(device=v.device).manual_seed(seed)
    lower, p = rounding_split(v.to(torch.promote_types(v.dtype, torch.float32)), qmin, qmax)
    u = torch.rand(v.shape, generator=generator, device=v.device, dtype=p.dtype)
    return lower + (u < p).to(p.dtype)
