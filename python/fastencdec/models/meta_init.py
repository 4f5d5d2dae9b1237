"""Build a module's structure on the ``meta`` device without running its initialisers.

Loading a checkpoint builds the model on ``meta`` (no memory) and then assigns the
stored tensors. Under ``torch.device("meta")`` alone, ``nn.init.normal_`` still runs,
and on a meta tensor PyTorch routes it through its Python decompositions, which import
``torch._dynamo`` and Triton: ~150 MiB of resident memory in every process that merely
loads a model, for values that are thrown away. ``on_meta()`` turns the ``nn.init``
functions into no-ops while the model is built (as ``transformers``' ``no_init_weights``
does). Not thread-safe: another thread initialising a module meanwhile is skipped too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# Every initialiser torch's own modules and ours call (nn.Linear, nn.Embedding,
# nn.LayerNorm, nn.Conv2d, models.layers.init_weights); each fills its argument in place.
_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "zeros_", "ones_",
                   "constant_", "orthogonal_")


def _skip(tensor, *args, **kwargs):
    return tensor


@contextlib.contextmanager
def on_meta():
    """``with on_meta(): model = cls(config)``: parameters on ``meta``, never initialised."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, _skip)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
