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

from .._lazy import lazy_names

# loaded on first use: the file reader (``safetensors_file``, which load_inference also
# uses) needs neither the engine nor the compiled module
__all__ = ["load", "EncoderDecoderRuntime", "DecoderOnlyRuntime", "default_threads"]

__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(__all__, "engine"),
                                  ("engine", "safetensors_file", "sampling", "weights"))
