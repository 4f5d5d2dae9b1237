"""What the one-call C++ paths (``decoder_step``: a decode step; ``encoder_pass``: the
encoder; ``decoder_prefill``: a decoder-only prompt) share: zero-copy views of an
int8/bf16 model's packed weights in the tuples the C++ classes take, and a per-model
cache of the built C++ objects.

A cached object is rebuilt when any packed weight is packed again
(``pack``/``load_state_dict``: ``quantize.pack_version``), when any module it was built
from is replaced, moved, added or removed, when a norm weight or bias it reads is
replaced or gets new storage (``.data = ...``, ``share_memory()``), or when a setting it
was built for changes (a norm's ``eps``, a layer's fused activation, causality). It
reads the norm weights and biases in place, so in-place updates are seen. Builders read
everything through :class:`Refs`, which records what they saw.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

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


class _TensorSeen(NamedTuple):
    tensor: torch.Tensor
    data_ptr: int


_WHERE = ("_modules", "_parameters", "_buffers")


class Refs(list):
    """(parent, where, name, what was seen) of everything a build read: ``where`` is the
    parent's dict holding ``name`` (``_modules``, ``_parameters``, ``_buffers``, or None
    for a plain attribute), so checking an entry is two dict lookups."""

    def get(self, parent, name: str):
        value = getattr(parent, name, None)
        where = next((w for w in _WHERE if name in parent.__dict__.get(w, ())), None)
        seen = _TensorSeen(value, value.data_ptr()) if isinstance(value, torch.Tensor) else value
        self.append((parent, where, name, seen))
        return value

    def modules(self) -> list[nn.Module]:
        """Every module the build read (parents and values), once each."""
        found: dict[int, nn.Module] = {}
        for parent, _, _, seen in self:
            for m in (parent, seen):
                if isinstance(m, nn.Module):
                    found.setdefault(id(m), m)
        return list(found.values())

    def items(self, container: nn.ModuleList) -> list:
        """The modules of ``container``, recording each one and that there are no more."""
        found = [self.get(container, str(i)) for i in range(len(container))]
        self.get(container, str(len(container)))  # None until a module is appended
        return found

    def stale(self) -> bool:
        """Whether anything read has changed since (tensors: replaced or new storage;
        modules and flags: replaced; other settings: unequal). Called before every
        decode step, so the common case is a tight loop over precomputed entries."""
        checks = self.__dict__.get("_checks")
        if checks is None:
            checks = self._checks = [_check_of(*entry) for entry in self]
        for attrs, where, name, kind, seen, ptr in checks:
            now = attrs[where].get(name) if where is not None else attrs.get(name)
            if kind == 0:  # identity
                if now is not seen:
                    return True
            elif kind == 1:  # a tensor and its storage
                if now is not seen or now.data_ptr() != ptr:
                    return True
            elif now != seen:
                return True
        return False


def _check_of(parent, where, name, seen):
    """(the parent's __dict__, where, name, kind, seen, data_ptr) for Refs.stale."""
    attrs = parent.__dict__
    if where is None and name not in attrs:  # a class attribute or nothing: read it back
        return (_ClassAttr(parent), None, name, 2 if not isinstance(seen, bool) else 0,
                seen, 0)
    if type(seen) is _TensorSeen:
        return attrs, where, name, 1, seen.tensor, seen.data_ptr
    identity = seen is None or isinstance(seen, (nn.Module, torch.Tensor, bool))
    return attrs, where, name, 0 if identity else 2, seen, 0


class _ClassAttr:
    """A mapping view of ``getattr(obj, name)`` (attributes not in the instance dict)."""

    def __init__(self, obj):
        self.obj = obj

    def get(self, name, default=None):
        return getattr(self.obj, name, default)


def linear(parent, name: str, fmt: str, refs: Refs, activation: str | None = None):
    """``parent.<name>`` as the C++ classes take a packed layer, or None when it is not a
    packed layer of ``fmt`` whose fused activation is ``activation``."""
    cls, dtype = FORMATS[fmt]
    module = refs.get(parent, name)
    if type(module) is not cls or module._packed is None:
        return None
    if refs.get(module, "activation") != activation:
        return None
    bias = refs.get(module, "bias")
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        return None
    bias = None if bias is None else bits(bias.detach())
    if fmt == "int8":
        return (*module._packed["args"], bias)
    return module._packed["args"][0], bias, module.out_features


def norm(parent, name: str, eps: float, refs: Refs):
    """``parent.<name>``'s fp32 RMSNorm weight, or None when it does not fit."""
    module = refs.get(parent, name)
    if not isinstance(module, RMSNorm) or refs.get(module, "eps") != eps:
        return None
    w = refs.get(module, "weight")
    if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
        return None
    return w.detach().numpy()


def build_blocks(model, fmt: str, blocks: str, final_norm: str, causal: bool):
    """(``_C.Int8Blocks``/``Bf16Blocks`` over the pre-norm blocks (layers.Block) in
    ``model.<blocks>`` with ``model.<final_norm>``, or None when one does not fit; refs)."""
    config, eps = model.config, model.config.norm_eps
    refs = Refs()
    if Int8Blocks is None:
        return None, refs
    layers = []
    for block in refs.items(refs.get(model, blocks)):
        attn, mlp = refs.get(block, "attn"), refs.get(block, "mlp")
        refs.get(block, "dropout")  # in training mode it needs the module path
        if refs.get(attn, "causal") != causal or not isinstance(mlp, GeluMLP):
            return None, refs
        parts = (norm(block, "norm1", eps, refs), linear(attn, "qkv_proj", fmt, refs),
                 linear(attn, "out_proj", fmt, refs), norm(block, "norm2", eps, refs),
                 linear(mlp, "fc1", fmt, refs, "gelu_tanh"), linear(mlp, "fc2", fmt, refs))
        if any(p is None for p in parts):
            return None, refs
        layers.append(parts)
    final = norm(model, final_norm, eps, refs)
    if final is None or not layers:
        return None, refs
    cls = Int8Blocks if fmt == "int8" else Bf16Blocks
    return cls(config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
               config.norm_eps, layers, final), refs


def activation_dtype(blocks) -> torch.dtype:
    """The activations' dtype of a ``_C.Int8Blocks``/``Bf16Blocks``."""
    return torch.bfloat16 if isinstance(blocks, Bf16Blocks) else torch.float32


def module_path_needed(model, kind: str, *inputs) -> bool:
    """Whether the module path must run instead of the one-call path ``kind`` (built by
    :func:`cached`): a forward hook would see one of the modules it replaces, one of them
    is in training mode, gradients are wanted (an input or a parameter requires them),
    or a backend other than the C++ kernels is forced (``FASTENCDEC_BACKEND``)."""
    from torch.nn.modules import module as nn_module

    from ..ops import dispatch

    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or nn_module._global_forward_hooks_always_called
            or dispatch.choose_backend("self_attention", "cpu") != "cpp"):
        return True
    if any(m.training or m._forward_hooks or m._forward_pre_hooks
           for m in replaced_modules(model, kind)):
        return True
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in inputs if t is not None)
        or any(p.requires_grad for p in model.parameters()))


def replaced_modules(model, kind: str) -> list[nn.Module]:
    """The modules the cached one-call path ``kind`` runs in their place ([] if none)."""
    entry = _CACHE.get(model, {}).get(kind)
    return [] if entry is None or entry[1] is None else entry[3]


# model -> {kind: (pack version, object or None, refs, the modules refs read)}; weak, so
# an object never outlives its model, and kept off the module so that copying or
# pickling a model never meets it
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached(model, kind: str, build):
    """The cached ``build(model, fmt)`` -> (object or None, Refs) of an int8/bf16
    ``model`` (None for any other model)."""
    version = quantize.pack_version()
    per_model = _CACHE.setdefault(model, {})
    entry = per_model.get(kind)
    if entry is None or entry[0] != version or entry[2].stale():
        fmt = quantize.weight_format(model)
        obj, refs = build(model, fmt) if fmt in FORMATS else (None, Refs())
        entry = (version, obj, refs, refs.modules())
        per_model[kind] = entry
    return entry[1]
