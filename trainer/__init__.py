"""hf_lotion.trainer: `LotionTrainer`, LOTION's regulariser and curvature estimators, diagnostics, recipes.

Installed inside the `hf_lotion` package from the repository's `trainer/` folder (one import root).
"""

from .curvature import CurvatureEstimator, FisherCurvature, GaussNewtonCurvature
from .diagnostics import grid_fraction
from .regularizer import LotionRegularizer, lotion_config_of
from .trainer import LotionTrainer

__all__ = [
    "CurvatureEstimator",
    "FisherCurvature",
    "GaussNewtonCurvature",
    "LotionRegularizer",
    "LotionTrainer",
    "grid_fraction",
    "lotion_config_of",
]
