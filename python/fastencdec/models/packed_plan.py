"""What the one-call C++ paths (``decoder_step``: a decode step; ``encoder_pass``: the
encoder) share: zero-copy views of an int8/bf16 model's packed weights in the tuples
the C++ classes take, and a per-model cache of the built C++ objects.

A cached object is rebuilt when any packed weight is packed again
(``pack``/``load_state_dict``: ``quantize.pack_version``), a norm weight or bias it
reads is replaced, or a setting it was built for changes (a norm's ``eps``, an MLP's
fused activation); it reads those tensors in place, so in-place updates are seen.
"""

from __future__ import annotations

import weakref

import torch

from . import quantize
from .layers import GeluMLP, RMSNorm

try:
    from fastencdec._C import Bf16Blocks, Int8Blocks
except ImportError:  # pragma: no cover - the compiled module is part of the package
    Bf16Blocks = Int8Blocks = None

# weight format -> (its linear layers, its activations' dtype)
FORMATS = {"int8": (quantize.Int8Linear, torch.float32),
           "bf16": (quantize.Bf16Linear, torch.bfloat16)}


def bits(t: torch.Tensor):
    """Zero-copy numpy view (bf16 as its uint16 bits)."""
    return t.numpy() if t.dtype is not torch.bfloat16 else t.view(torch.uint16).numpy()


def linear(module, fmt: str, refs: list) -> tuple | None:
    """The packed layer as the C++ classes take it, or None when it is not one of ``fmt``."""
    cls, dtype = FORMATS[fmt]
    if type(module) is not cls or module._packed is None:
        return None
    bias = module.bias
    refs.append((module, "bias", bias))
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        return None
    bias = None if bias is None else bits(bias.detach())
    if fmt == "int8":
        return (*module._packed["args"], bias)
    return module._packed["args"][0], bias, module.out_features


def fused_gelu(module, refs: list) -> bool:
    """Whether linear ``module`` applies GELU(tanh) in its epilogue (as the C++ MLPs do)."""
    activation = getattr(module, "activation", None)
    refs.append((module, "activation", activation))
    return activation == "gelu_tanh"


def norm(module, eps: float, refs: list):
    """An RMSNorm's fp32 weight, or None when the module does not fit."""
    if not isinstance(module, RMSNorm):
        return None
    refs.append((module, "eps", module.eps))
    if module.eps != eps:
        return None
    w = module.weight
    refs.append((module, "weight", w))
    if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
        return None
    return w.detach().numpy()


def build_blocks(model, fmt: str, blocks, final_norm, causal: bool):
    """(``_C.Int8Blocks``/``Bf16Blocks`` over the pre-norm ``blocks`` (layers.Block) with
    ``final_norm``, or None when one does not fit; refs)."""
    config = model.config
    refs: list = []
    if Int8Blocks is None:
        return None, refs
    layers = []
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        refs.append((attn, "causal", attn.causal))
        if attn.causal != causal or not isinstance(mlp, GeluMLP) or not fused_gelu(mlp.fc1, refs):
            return None, refs
        parts = (norm(block.norm1, config.norm_eps, refs),
                 linear(attn._modules.get("qkv_proj"), fmt, refs),
                 linear(attn.out_proj, fmt, refs), norm(block.norm2, config.norm_eps, refs),
                 linear(mlp.fc1, fmt, refs), linear(mlp.fc2, fmt, refs))
        if any(p is None for p in parts):
            return None, refs
        layers.append(parts)
    final = norm(final_norm, config.norm_eps, refs)
    if final is None or not layers:
        return None, refs
    cls = Int8Blocks if fmt == "int8" else Bf16Blocks
    return cls(config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
               config.norm_eps, layers, final), refs


def activation_dtype(blocks) -> torch.dtype:
    """The activations' dtype of a ``_C.Int8Blocks``/``Bf16Blocks``."""
    return torch.bfloat16 if isinstance(blocks, Bf16Blocks) else torch.float32


def hooked(modules) -> bool:
    """Whether a forward hook would see one of ``modules`` (a one-call path skips them)."""
    from torch.nn.modules import module as nn_module
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or nn_module._global_forward_hooks_always_called):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# model -> {kind: (pack version, object or None, refs)}; weak, so an object never
# outlives its model, and kept off the module so that copying or pickling a model never
# meets it
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _changed(now, seen) -> bool:
    if isinstance(seen, torch.Tensor) or isinstance(now, torch.Tensor):
        return now is not seen  # replaced (in-place updates are read anyway)
    return now != seen


def cached(model, kind: str, build):
    """The cached ``build(model, fmt)`` -> (object or None, refs) of an int8/bf16
    ``model`` (None for any other model)."""
    version = quantize.pack_version()
    per_model = _CACHE.setdefault(model, {})
    entry = per_model.get(kind)
    if (entry is None or entry[0] != version
            or any(_changed(getattr(m, name, None), seen) for m, name, seen in entry[2])):
        fmt = quantize.weight_format(model)
        obj, refs = build(model, fmt) if fmt in FORMATS else (None, [])
        entry = (version, obj, refs)
        per_model[kind] = entry
    return entry[1]
