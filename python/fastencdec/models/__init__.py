"""Models: configurations, the encoder-decoder LM and its decoder-only baseline.

Names load on first use: ``fastencdec.models.config`` alone (what the torch-free
runtime reads) does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_names

# name -> the submodule that defines it
_EXPORTS = {
    "ops_backend": "backend",
    "EncDecConfig": "config",
    "DecoderOnlyConfig": "config",
    "DecoderOnlyLM": "decoder_only",
    "EncoderDecoderLM": "encoder_decoder",
    "LMOutput": "outputs",
    "Bf16Linear": "quantize",
    "Int8Linear": "quantize",
    "fuse_linears": "quantize",
    "load_inference": "quantize",
    "save_inference": "quantize",
    "to_inference": "quantize",
    "size_decoder_only_to": "sizing",
    "size_encdec_to_budget": "sizing",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
