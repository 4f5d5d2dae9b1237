"""Models: configurations, the encoder-decoder LM and its decoder-only baseline."""

from .backend import ops_backend
from .config import DecoderOnlyConfig, EncDecConfig
from .decoder_only import DecoderOnlyLM
from .encoder_decoder import EncoderDecoderLM
from .outputs import LMOutput
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
]
