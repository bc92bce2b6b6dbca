"""hf_lotion.cards: model-card template, rendering, plots and Hub publishing.

Installed inside the `hf_lotion` package from the repository's `cards/` folder (one import root).
Its contents land with the publishing issue.
"""
