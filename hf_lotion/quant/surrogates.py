"""Surrogate derivatives of rounding: what a fake-quantized backward multiplies the weight gradient by.

A fake-quantized forward computes `w_hat = s * clamp(round(w / s))`. Its backward passes
`dL/dw = dL/dw_hat * g(v)` inside the clip range (zero outside), with `v = w / s` and a surrogate `g`
for the derivative of `round`. Each surrogate is a plain-PyTorch reference function; the Triton
fake-quant kernel evaluates one family, truncated Fourier series (STE is its empty case), and a
surrogate says through `kernel_amplitudes` whether it belongs to that family. One that does not runs its
reference on every device, never another surrogate's kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .spec import SURROGATE_COEFF, validate_amplitudes


def _math_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.float64 if v.dtype == torch.float64 else torch.float32


class Surrogate:
    """Base class: `g(v)`, the backward's stand-in for `d round(v) / dv`, applied inside the clip range.

    Subclasses implement `__call__` (the reference, on any device) and set `kernel_amplitudes` to the
    Fourier amplitudes the Triton kernel should evaluate, or leave it `None` when no kernel exists.
    Instances must be immutable and hashable (frozen dataclasses), as they are passed through autograd.

    Example:
        >>> @dataclass(frozen=True)
        ... class Clipped(Surrogate):
        ...     def __call__(self, v):
        ...         return (1.0 - 2.0 * (v - torch.round(v)).abs()).clamp_min(0.0)
        >>> Clipped()(torch.tensor([0.0, 0.25, 0.5]))
        tensor([1.0000, 0.5000, 0.0000])
    """

    kernel_amplitudes: tuple[float, ...] | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class StraightThrough(Surrogate):
    """`g = 1`: the straight-through estimator."""

    @property
    def kernel_amplitudes(self) -> tuple[float, ...]:
        return ()

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(v, dtype=_math_dtype(v))


@dataclass(frozen=True)
class FourierSurrogate(Surrogate):
    """StableQAT's `g(v) = (1 - c S) / (1 + c S)`, `S = sum_k a_k cos((2k+1) pi (v + round(v)))`, `c = sqrt(2) pi`.

    `g` depends only on `r = v - round(v)`: 1 at `r = +-1/2`, about 0.0347 at `r = 0` for `a = [0.21]`;
    `amplitudes=()` is exactly STE.

    Example:
        >>> round(FourierSurrogate((0.21,))(torch.tensor([0.0])).item(), 6)
        0.034658
    """

    amplitudes: tuple[float, ...] = (0.21,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "amplitudes", validate_amplitudes(self.amplitudes, "FourierSurrogate"))

    @property
    def kernel_amplitudes(self) -> tuple[float, ...]:
        return self.amplitudes

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(_math_dtype(v))
        if not self.amplitudes:
            return torch.ones_like(v)
        # cos((2k+1) pi (v + round(v))) == cos((2k+1) pi r) with r = v - round(v) (exact in floating point);
        # using r keeps the phase small and accurate in float32 even for large |v|.
        phase = math.pi * (v - torch.round(v))
        series = sum(a * torch.cos((2 * k + 1) * phase) for k, a in enumerate(self.amplitudes))
        cs = SURROGATE_COEFF * series
        return (1.0 - cs) / (1.0 + cs)


def as_surrogate(surrogate: Surrogate | Sequence[float] | None) -> Surrogate:
    """A `Surrogate` from a surrogate, Fourier amplitudes (`[]` is STE) or `None` (STE)."""
    if surrogate is None:
        return StraightThrough()
    if isinstance(surrogate, Surrogate):
        return surrogate
    amplitudes = tuple(surrogate)
    return FourierSurrogate(amplitudes) if amplitudes else StraightThrough()
