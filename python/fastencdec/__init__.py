"""fastencdec: kernels and a thin PyTorch layer for small encoder-decoder LMs."""

from . import ops, reference
from .models import (
    DecoderOnlyConfig,
    DecoderOnlyLM,
    EncDecConfig,
    EncoderDecoderLM,
    load_inference,
    to_inference,
)
from .spec import Rope

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "EncDecConfig",
    "DecoderOnlyConfig",
    "EncoderDecoderLM",
    "DecoderOnlyLM",
    "Rope",
    "to_inference",
    "load_inference",
    "__version__",
]
