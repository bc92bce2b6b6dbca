"""hf_lotion.cards: model cards (metadata, body and plots) for models quantized with hf_lotion.

Installed inside the `hf_lotion` package from the repository's `cards/` folder (one import root).

    >>> from hf_lotion.cards import CardFacts, save_card
    >>> save_card(model, "out", CardFacts(base_model="HuggingFaceTB/SmolLM2-135M"))  # doctest: +SKIP
"""

from .card import CardFacts, build_card, save_card

__all__ = ["CardFacts", "build_card", "save_card"]
