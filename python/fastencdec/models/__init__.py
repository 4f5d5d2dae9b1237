"""Models: configurations, the encoder-decoder LM and its decoder-only baseline."""

from .backend import ops_backend
from .config import DecoderOnlyConfig, EncDecConfig
from .decoder_only import DecoderOnlyLM
from .encoder_decoder import EncoderDecoderLM
from .outputs import LMOutput
from .quantize import (
    Bf16Linear,
    Int8Linear,
    fuse_linears,
    load_inference,
    save_inference,
    to_inference,
)
from .sizing import size_decoder_only_to, size_encdec_to_budget

__all__ = [
    "EncDecConfig",
    "DecoderOnlyConfig",
    "EncoderDecoderLM",
    "DecoderOnlyLM",
    "LMOutput",
    "ops_backend",
    "size_encdec_to_budget",
    "size_decoder_only_to",
    "to_inference",
    "save_inference",
    "load_inference",
    "Int8Linear",
    "Bf16Linear",
    "fuse_linears",
]
