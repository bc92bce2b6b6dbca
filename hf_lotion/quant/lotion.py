"""LOTION: the rounding-noise regulariser of the randomized-rounding-smoothed loss.

With `v = clamp(w / s, qmin, qmax) = n + p`, randomized rounding has variance `sigma^2 = s^2 p (1 - p)`.
LOTION's Gauss-Newton objective is `L(w) + (lambda / 2) * sum_i G_ii sigma_i^2(w)` with a diagonal
curvature estimate `G` held constant and the scale detached. The gradient of the penalty is
`(lambda / 2) G s (1 - 2p)`, except at grid points (`p = 0`, including everything clipped to the range
ends) where `sigma^2` has a kink and the zero subgradient is used: taking `(1 - 2p) = 1` there pushes
on-grid weights (every group's absmax element) outward and inflates the scales.
"""

from __future__ import annotations

import torch

from .grid import grouped, int_range, scaled_values


def rounding_position(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """`p`, the fractional position of each weight between its two grid neighbours, `(out, in)`.

    float32, or float64 for float64 inputs (as every function here)."""
    qmin, qmax = int_range(bits)
    v = scaled_values(weight.detach(), scales.detach(), group_size).clamp(qmin, qmax)
    return (v - torch.floor(v)).reshape(weight.shape)


def _grouped_position(
    weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`p` grouped `(out, n_groups, group)` and the detached scales broadcast to it, in `p`'s dtype."""
    p = grouped(rounding_position(weight, scales, bits, group_size), group_size)
    return p, scales.detach().to(p.dtype).unsqueeze(-1)


def _variance(p: torch.Tensor, s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return (s * s * p * (1.0 - p)).reshape(shape)


def _slope(p: torch.Tensor, s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`d sigma^2 / dw = s (1 - 2p)`, with the zero subgradient at grid points (`p = 0`)."""
    return torch.where(p > 0, s * (1.0 - 2.0 * p), 0.0).reshape(shape)


def rounding_variance(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """`sigma^2 = s^2 p (1 - p)`, the variance of randomized rounding, `(out, in)`.

    Example:
        >>> rounding_variance(torch.tensor([[0.23]]), torch.tensor([[0.1]]), bits=4, group_size=-1)
        tensor([[0.0021]])
    """
    return _variance(*_grouped_position(weight, scales, bits, group_size), weight.shape)


def lotion_penalty(
    weight: torch.Tensor,
    scales: torch.Tensor,
    curvature: torch.Tensor,
    bits: int,
    group_size: int,
    strength: float = 1.0,
) -> torch.Tensor:
    """The penalty's value `(lambda / 2) * sum G * sigma^2`, a scalar (no autograd)."""
    sigma2 = rounding_variance(weight, scales, bits, group_size)
    return 0.5 * strength * (curvature.detach().to(sigma2.dtype) * sigma2).sum()


def lotion_penalty_grad(
    weight: torch.Tensor,
    scales: torch.Tensor,
    curvature: torch.Tensor,
    bits: int,
    group_size: int,
    strength: float = 1.0,
) -> torch.Tensor:
    """The penalty's gradient `(lambda / 2) G s (1 - 2p)`, zero at grid points, in the weight's dtype.

    Example:
        >>> lotion_penalty_grad(torch.tensor([[0.23]]), torch.tensor([[0.1]]), torch.ones(1, 1), 4, -1, 2.0)
        tensor([[0.0400]])
    """
    p, s = _grouped_position(weight, scales, bits, group_size)
    slope = _slope(p, s, weight.shape)
    return (0.5 * strength * curvature.detach().to(p.dtype) * slope).to(weight.dtype)


def add_penalty_grad(
    grad: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    curvature: torch.Tensor,
    bits: int,
    group_size: int,
    coefficient: float,
    multiplier: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`grad + multiplier * coefficient * G * s (1 - 2p)` (zero on the grid) and the penalty's value.

    This is what LOTION adds to a weight's gradient inside backward: `coefficient` is `lambda / 2` (times
    the curvature EMA's bias correction when `curvature` is the raw EMA) and `multiplier` is the gradient
    that reached the loss (gradient-accumulation division, a micro-batch's share of the tokens, an fp16 loss
    scale). The sum is formed in float32 (float64 for float64 inputs) and rounded once to `grad`'s dtype.
    The value is `coefficient * sum G s^2 p (1 - p)`, a float32 (float64) scalar, without `multiplier`.

    Example:
        >>> g, v = add_penalty_grad(torch.zeros(1, 1), torch.tensor([[0.23]]), torch.tensor([[0.1]]),
        ...                         torch.ones(1, 1), bits=4, group_size=-1, coefficient=1.0, multiplier=2.0)
        >>> g, v
        (tensor([[0.0800]]), tensor(0.0021))
    """
    p, s = _grouped_position(weight, scales, bits, group_size)
    g = curvature.detach().to(p.dtype)
    value = coefficient * (g * _variance(p, s, weight.shape)).sum()
    step = g * _slope(p, s, weight.shape)
    if isinstance(multiplier, torch.Tensor):
        scale = multiplier.detach().to(device=step.device, dtype=p.dtype) * coefficient
    else:
        scale = float(multiplier) * coefficient
    return (grad.to(p.dtype) + scale * step).to(grad.dtype), value


def grid_distance(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Distance of each (clamped) weight to its nearest grid point, in units of its scale: in [0, 0.5].

    Example:
        >>> grid_distance(torch.tensor([[0.23, 0.3]]), torch.tensor([[0.1]]), bits=4, group_size=-1)
        tensor([[0.3000, 0.0000]])
    """
    p = rounding_position(weight, scales, bits, group_size)
    return torch.minimum(p, 1.0 - p)


class _LotionPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scales, curvature, bits, group_size, strength):
        ctx.save_for_backward(weight, scales, curvature)
        ctx.bits, ctx.group_size, ctx.strength = bits, group_size, strength
        return lotion_penalty(weight, scales, curvature, bits, group_size, strength)

    @staticmethod
    def backward(ctx, grad_output):
        weight, scales, curvature = ctx.saved_tensors
        p, s = _grouped_position(weight, scales, ctx.bits, ctx.group_size)
        # Formed in float32 (float64) with grad_output and rounded once to the weight's dtype.
        step = 0.5 * ctx.strength * curvature.detach().to(p.dtype) * _slope(p, s, weight.shape)
        grad = step * grad_output.to(p.dtype)
        return grad.to(weight.dtype), None, None, None, None, None


def lotion_regularizer(
    weight: torch.Tensor,
    scales: torch.Tensor,
    curvature: torch.Tensor,
    bits: int,
    group_size: int,
    strength: float = 1.0,
) -> torch.Tensor:
    """LOTION's penalty as a differentiable scalar: add it to the loss in a plain PyTorch loop.

    Its backward is `lotion_penalty_grad` (scale and curvature detached, zero subgradient on the grid).

    Example:
        >>> w = torch.tensor([[0.23]], requires_grad=True)
        >>> lotion_regularizer(w, torch.tensor([[0.1]]), torch.full((1, 1), 4.0), bits=4, group_size=-1).backward()
        >>> w.grad
        tensor([[0.0800]])
    """
    return _LotionPenalty.apply(weight, scales, curvature, bits, group_size, float(strength))
