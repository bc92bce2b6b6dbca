"""hf_lotion.trainer: `LotionTrainer`, diagnostics and recipes.

Installed inside the `hf_lotion` package from the repository's `trainer/` folder (one import root).
"""

from .diagnostics import grid_fraction
from .trainer import LotionTrainer, lotion_config_of

__all__ = ["LotionTrainer", "grid_fraction", "lotion_config_of"]
