"""fastencdec: kernels and a thin PyTorch layer for small encoder-decoder LMs.

The names below load on first use, so ``import fastencdec.runtime`` (the torch-free
CPU runtime for int8/bf16 models) never imports torch; everything else imports it
when first touched, e.g. ``fastencdec.EncoderDecoderLM`` or ``import fastencdec.ops``
(which also registers the ``torch.ops.fastencdec`` custom ops; importing fastencdec
after torch registers them at once).
"""

from __future__ import annotations

import sys

from ._lazy import lazy_names

__version__ = "0.1.0"

# name -> the submodule that defines it
_EXPORTS = {
    "EncDecConfig": "models",
    "DecoderOnlyConfig": "models",
    "EncoderDecoderLM": "models",
    "DecoderOnlyLM": "models",
    "to_inference": "models",
    "load_inference": "models",
    "Rope": "spec",
}
_SUBMODULES = ("_C", "argcheck", "cli", "constants", "convert", "data", "generation", "info",
               "inputs", "kv_cache", "models", "ops", "reference", "runtime", "selfcheck",
               "spec", "training", "vision")

__all__ = ["ops", "reference", *_EXPORTS, "__version__"]


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, _SUBMODULES)


# With torch already loaded, register the torch.ops.fastencdec custom ops now, as an
# eager package would (e.g. for torch.export.load of a program that calls them); without
# it, ``import fastencdec.ops`` (or any model or op) registers them on first use.
if "torch" in sys.modules:
    from . import ops  # noqa: E402,F401


