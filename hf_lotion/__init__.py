"""hf-lotion: quantization-aware training (LOTION, StableQAT, STE) for Hugging Face transformers.

Importing the package registers quant_method "lotion" with transformers, so that

    >>> from transformers import AutoModelForCausalLM
    >>> import hf_lotion
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_lotion.LotionConfig(bits=4))  # doctest: +SKIP

gives a model whose linear layers train quantization-aware (with `hf_lotion.LotionTrainer`, or a plain
loop plus `hf_lotion.LotionRegularizer`), and reloading a saved one needs only `import hf_lotion` first.
"""

from .config import LotionConfig
from .convert import convert
from .exports import export_compressed_tensors
from .nn import LotionLinear, PackedLinear, is_lotion_model, latent_weights, lotion_layers
from .quant import QuantSpec, lotion_regularizer
from .quantizer import LotionHfQuantizer, prepare, register_with_transformers

__version__ = "0.1.0"

register_with_transformers()

# The trainer pulls in transformers.Trainer (and accelerate): import it only when asked for.
_LAZY = {"LotionTrainer", "LotionRegularizer", "grid_fraction"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LotionConfig",
    "LotionHfQuantizer",
    "LotionLinear",
    "LotionRegularizer",
    "LotionTrainer",
    "PackedLinear",
    "QuantSpec",
    "__version__",
    "convert",
    "export_compressed_tensors",
    "grid_fraction",
    "is_lotion_model",
    "latent_weights",
    "lotion_layers",
    "lotion_regularizer",
    "prepare",
]
