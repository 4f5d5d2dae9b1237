"""Models: configurations, the encoder-decoder LM and its decoder-only baseline.

Names load on first use: ``fastencdec.models.config`` alone (what the torch-free
runtime reads) does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.util

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


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif (name.isidentifier() and not name.startswith("__")
          and importlib.util.find_spec(f"{__name__}.{name}")):
        value = importlib.import_module(f".{name}", __name__)  # a submodule
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
