"""The torch-free CPU runtime: serve an int8 or bf16 model saved by
``fastencdec.models.save_inference`` with numpy and the C++ kernels alone.

    import fastencdec.runtime as rt
    model = rt.load("mu-330m-int8/")              # never imports torch
    new_tokens = model.generate([[5, 17, 42]], max_new_tokens=64)

Why: ``import torch`` alone costs ~220 MiB of resident memory (its shared libraries'
relocations and the Python modules it loads), as much as two thirds of mu-330m's int8
weights; on an edge CPU that is the difference between fitting and not. The kernels
never needed torch: the C++ module takes numpy arrays, and the int8/bf16 encoder,
prompt and decode step each run in one call (``Int8Blocks``, ``Int8DecoderStep``).
Loading reads each tensor once into its packed layout (no file mapping), so the peak
while loading is the weights plus one layer.

Greedy tokens and every step's logits equal the torch model's (``load_inference`` of
the same directory, ``model.generate``) bitwise; ``generate`` takes the same arguments
(sampling draws from numpy's generator, ``seed=``).
"""

from __future__ import annotations

import importlib

# loaded on first use: the file reader (``safetensors_file``, which load_inference also
# uses) needs neither the engine nor the compiled module
__all__ = ["load", "EncoderDecoderRuntime", "DecoderOnlyRuntime", "default_threads"]


_SUBMODULES = ("engine", "safetensors_file", "sampling", "weights")


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module(".engine", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
