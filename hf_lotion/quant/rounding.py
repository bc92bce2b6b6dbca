"""Randomized (stochastic) rounding, the noise model behind LOTION, with a counter-based generator.

`RR(v)` rounds `v = n + p` (`n = floor(v)`, `p` in [0, 1)) up with probability `p`: it is unbiased,
leaves grid points fixed, and has variance `p (1 - p)` in units of the scale.

Seeded draws are counter-based: element `i` (its row-major index, plus an `offset`) gets the uniform
`u_i = (philox(seed, i) >> 8) * 2**-24`, with Philox-4x32-10 as Triton's `tl.randint` computes it. The
noise is therefore a pure function of `(seed, offset + i)`: the same on every device, in this reference
and in the Triton kernel, whatever the block sizes, and a backward pass regenerates it from the seed
instead of storing it.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Philox-4x32 round multipliers and Weyl key increments (Salmon et al. 2011; Triton's constants).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
# 24 random bits give uniforms on an exact fp32 grid: (bits >> 8) * 2**-24 lies in [0, 1).
UNIFORM_STEP = 2.0**-24
MAX_SEED = 2**63 - 1


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of `a * b` for 32-bit unsigned values held in int64 (no int64 overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_low = a_lo * b_lo
    cross = a_hi * b_lo + a_lo * b_hi
    high = a_hi * b_hi + ((cross + (low_low >> 16)) >> 16)
    return high, ((cross << 16) + low_low) & _MASK32


def check_counter(seed: int, offset: int = 0) -> None:
    """Reject a seed or counter offset outside what the generator takes (every path calls this first)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed} is not supported; allowed: an integer in [0, 2**63 - 1].")
    if offset < 0:
        raise ValueError(f"offset={offset} is not supported; allowed: an integer >= 0.")


def philox_uint32(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Philox-4x32-10 of `counters` (int64, >= 0) under `seed`: first output word, int64 in [0, 2**32).

    Bit-identical to Triton's `tl.randint(seed, counters)` with int64 counters.
    """
    check_counter(seed)
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(counters)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0


def counter_uniform(
    seed: int, shape: torch.Size | tuple[int, ...], offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniforms in [0, 1) (fp32) for the elements of `shape`, a function of `(seed, offset + index)` only.

    Example:
        >>> torch.equal(counter_uniform(7, (2, 3))[1], counter_uniform(7, (3,), offset=3))
        True
    """
    check_counter(seed, offset)
    numel = 1
    for size in shape:
        numel *= size
    counters = torch.arange(offset, offset + numel, device=device, dtype=torch.int64)
    bits = philox_uint32(int(seed), counters) >> 8
    return (bits.to(torch.float32) * UNIFORM_STEP).reshape(shape)


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
    offset: int = 0,
) -> torch.Tensor:
    """Unbiased randomized rounding of `v` (already divided by the scale) to integers in `[qmin, qmax]`.

    With a `seed`, the draw is counter-based (see the module docstring): element `i` of `v` (row-major)
    uses counter `offset + i`, so the result is the same on CPU, GPU and in the Triton kernel. With a
    `generator` (or neither), `torch.rand` draws the noise.

    Example:
        >>> stochastic_round(torch.tensor([0.25, 2.0, -0.5]), -8, 7, seed=0)
        tensor([0., 2., 0.])
    """
    if generator is not None and seed is not None:
        raise ValueError("stochastic_round takes a generator or a seed, not both.")
    lower, p = rounding_split(v.to(torch.promote_types(v.dtype, torch.float32)), qmin, qmax)
    if seed is None:
        u = torch.rand(v.shape, generator=generator, device=v.device, dtype=p.dtype)
    else:
        u = counter_uniform(seed, v.shape, offset, v.device).to(p.dtype)
    return lower + (u < p).to(p.dtype)
