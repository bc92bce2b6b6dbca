"""hf-lotion: quantization-aware training (LOTION, StableQAT, STE) for Hugging Face transformers.

Importing the package registers quant_method "lotion" with transformers, so that

    >>> from transformers import AutoModelForCausalLM
    >>> import hf_lotion
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_lotion.LotionConfig(bits=4))  # doctest: +SKIP

gives a model whose linear layers train quantization-aware, and reloading a saved one needs only
`import hf_lotion` first.
"""

from .config import LotionConfig
from .convert import convert
from .exports import export_compressed_tensors
from .nn import LotionLinear, PackedLinear, is_lotion_model, lotion_layers
from .quant import QuantSpec, lotion_regularizer
from .quantizer import LotionHfQuantizer, prepare, register_with_transformers

__version__ = "0.1.0"

register_with_transformers()

__all__ = [
    "LotionConfig",
    "LotionHfQuantizer",
    "LotionLinear",
    "PackedLinear",
    "QuantSpec",
    "__version__",
    "convert",
    "export_compressed_tensors",
    "is_lotion_model",
    "lotion_layers",
    "lotion_regularizer",
    "prepare",
]
