"""hf-lotion: quantization-aware training (LOTION, StableQAT, STE) for Hugging Face transformers.

Importing the package registers quant_method "lotion" with transformers, so that

    >>> from transformers import AutoModelForCausalLM
    >>> import hf_lotion
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_lotion.LotionConfig(bits=4))  # doctest: +SKIP

gives a model whose linear layers train quantization-aware in any training loop (`transformers.Trainer`,
TRL, accelerate, a plain PyTorch loop, or `hf_lotion.LotionTrainer`, which adds logging and latent
evaluation), and reloading a saved one needs only `import hf_lotion` first.
"""

from .adapters import install_peft_integration, requantizing_merge
from .config import LotionConfig
from .convert import convert
from .exports import export_compressed_tensors
from .gguf_export import export_gguf
from .methods import Option, Penalty, QatMethod, method_names, register_method, unregister_method
from .nn import (
    LotionLinear,
    PackedLinear,
    add_lotion_penalty,
    is_lotion_model,
    latent_weights,
    lotion_layers,
    penalty_runtime,
)
from .quant import QuantSpec, Surrogate, lotion_regularizer
from .quantizer import LotionHfQuantizer, prepare, register_with_transformers

__version__ = "0.1.0"

register_with_transformers()
install_peft_integration()

# The trainer pulls in transformers.Trainer (and accelerate), the cards huggingface_hub's card and upload
# machinery: import them only when asked for.
_LAZY = {
    "LotionTrainer": "trainer",
    "grid_fraction": "trainer",
    "CardFacts": "cards.card",
    "save_card": "cards.card",
    "push_to_hub": "cards.push",
    "PushError": "cards.push",
}
_REMOVED = {
    "LotionRegularizer": (
        "hf_lotion.LotionRegularizer was removed: LOTION's penalty is now part of the model's loss and trains in "
        "any loop. Delete the `regularizer.step(...)` call; for a loss computed outside the model use "
        "`loss = hf_lotion.add_lotion_penalty(model, loss, num_tokens=...)`."
    )
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _REMOVED:
        raise AttributeError(_REMOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CardFacts",
    "LotionConfig",
    "LotionHfQuantizer",
    "LotionLinear",
    "LotionTrainer",
    "Option",
    "PackedLinear",
    "Penalty",
    "PushError",
    "QatMethod",
    "QuantSpec",
    "Surrogate",
    "__version__",
    "add_lotion_penalty",
    "convert",
    "export_compressed_tensors",
    "export_gguf",
    "grid_fraction",
    "is_lotion_model",
    "latent_weights",
    "lotion_layers",
    "lotion_regularizer",
    "method_names",
    "penalty_runtime",
    "prepare",
    "push_to_hub",
    "register_method",
    "requantizing_merge",
    "save_card",
    "unregister_method",
]
