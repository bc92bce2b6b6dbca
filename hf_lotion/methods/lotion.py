"""`lotion` (arXiv 2510.08757): train the latent weights on `L(w) + (lambda/2) sum G sigma^2(w)`.

`sigma^2 = s^2 p (1 - p)` is the variance of unbiased randomized rounding and `G` a diagonal curvature
estimate, so the penalty is the expected loss increase from rounding noise (the paper's Gauss-Newton form
of `E[L(RR(w))]`). The forward uses the latent weight; the penalty's gradient `(lambda/2) G s (1 - 2p)`
(zero on grid points) enters the backward through the model's loss, so it trains in any loop
(`hf_lotion.nn.penalty`). `G` is the per-token empirical Fisher of each layer, `sum_t delta_t^2 x_t^2 / N`
from the layer's own output gradients and inputs, whose scale does not depend on the batch size.
"""

from __future__ import annotations

from ..quant.spec import (
    validate_choice,
    validate_positive_float,
    validate_positive_int,
    validate_unit_interval,
)
from .base import Option, Penalty, QatMethod, register_method

# The per-token empirical Fisher of each layer (see `hf_lotion.nn.penalty`).
CURVATURE_ESTIMATORS = ("fisher",)


def _curvature(name: str, value: object, owner: str) -> str:
    return validate_choice(name, value, CURVATURE_ESTIMATORS, owner)


@register_method
class Lotion(QatMethod):
    """LOTION: latent-weight forward plus the curvature-weighted rounding-noise penalty."""

    name = "lotion"
    options = (
        Option("lotion_lambda", 1.0, validate_positive_float, "penalty strength (the paper's lambda), >= 0"),
        Option("curvature", "fisher", _curvature, "curvature estimate G: the per-token empirical Fisher"),
        Option("curvature_beta", 0.99, validate_unit_interval, "EMA decay of G, in [0, 1)"),
        # Every 4 steps by measurement: the estimate's extra matmul made a CPU step 1.50x full precision
        # every step, 1.30x every 4 and 1.20x every 16 (benchmarks/step_time.py).
        Option("curvature_every", 4, validate_positive_int, "optimizer steps between curvature estimates"),
    )

    def penalty(self) -> Penalty | None:
        if self.lotion_lambda == 0:
            return None
        return Penalty(self.lotion_lambda, self.curvature_beta, self.curvature_every)
