"""hf_lotion.trainer: `LotionTrainer`, curvature estimators, callbacks and recipes.

Installed inside the `hf_lotion` package from the repository's `trainer/` folder (one import root).
Its contents land with the training issue; the QAT model itself already trains with a plain
`transformers.Trainer` or a hand-written loop (see the README).
"""
