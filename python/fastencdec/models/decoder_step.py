"""The int8 / bf16 decode step in one C++ call (``_C.Int8DecoderStep``,
``_C.Bf16DecoderStep``), for encoder-decoder and decoder-only models.

Called module by module from Python, a batch-1 mu-330m int8 decode step spent ~40% of
its time between the kernels (module calls, op wrappers, views). For a model converted
by ``to_inference(model, "int8" | "bf16")`` (fused QKV, GELU in fc1's epilogue) the
whole decoder -- norms, projections, RoPE + cache append, cache attention,
cross-attention (encoder-decoder), MLP, residuals, final norm and LM head -- runs as one
call to the same kernels in the same order, so the logits equal the module path's
bitwise (tested). int8 steps take fp32 activations; bf16 steps bf16 activations,
caches and cross K/V, and return bf16 logits, like the module path.

``step_plan(model)`` returns the plan, or None when the model is not such a model; the
plan is rebuilt when any packed weight is packed again (``pack``/``load_state_dict``) or
a norm weight or bias is replaced, and reads the norm weights and biases in place
(in-place updates are seen).
``EncoderDecoderLM.decode_step`` and ``DecoderOnlyLM.decode_step`` use it for
one-token steps; everything else (training mode, several tokens per step, dynamic-NTK
recomputation) takes the module path.
"""

from __future__ import annotations

import weakref

import torch

from . import quantize
from .layers import GeluMLP, RMSNorm

try:
    from fastencdec._C import Bf16DecoderStep, Int8DecoderStep
except ImportError:  # pragma: no cover - the compiled module is part of the package
    Bf16DecoderStep = Int8DecoderStep = None

# weight format -> (the C++ step, its linear layers, its activations' dtype)
_FORMATS = {"int8": (lambda: Int8DecoderStep, quantize.Int8Linear, torch.float32),
            "bf16": (lambda: Bf16DecoderStep, quantize.Bf16Linear, torch.bfloat16)}


def _bits(t: torch.Tensor):
    """Zero-copy numpy view (bf16 as its uint16 bits)."""
    return t.numpy() if t.dtype is not torch.bfloat16 else t.view(torch.uint16).numpy()


def _linear(module, fmt: str, refs: list) -> tuple | None:
    _, cls, dtype = _FORMATS[fmt]
    if type(module) is not cls or module._packed is None:
        return None
    bias = module.bias
    refs.append((module, "bias", bias))
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        return None
    bias = None if bias is None else _bits(bias.detach())
    if fmt == "int8":
        return (*module._packed["args"], bias)
    return module._packed["args"][0], bias, module.out_features


def _norm(module, eps: float, refs: list):
    if not isinstance(module, RMSNorm) or module.eps != eps:
        return None
    w = module.weight
    refs.append((module, "weight", w))
    if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
        return None
    return w.detach().numpy()


def _blocks(model):
    """(decoder blocks, final norm, whether they cross-attend) of either architecture."""
    if getattr(model, "is_encoder_decoder", False):
        return model.decoder, model.decoder_norm, True
    return model.layers, model.norm, False


def _build(model, fmt: str):
    """(the C++ step for ``model`` in ``fmt`` or None when its structure does not fit,
    the (module, attribute, tensor) triples whose replacement makes it stale)."""
    config = model.config
    lin = lambda module: _linear(module, fmt, refs)  # noqa: E731
    eps = config.norm_eps
    blocks, final_norm, cross = _blocks(model)
    layers, refs = [], []
    for block in blocks:
        attn, mlp = (block.self_attn if cross else block.attn), block.mlp
        qkv = attn._modules.get("qkv_proj")
        if not isinstance(mlp, GeluMLP) or getattr(mlp.fc1, "activation", None) != "gelu_tanh":
            return None, refs
        parts = [_norm(block.norm1, eps, refs), lin(qkv), lin(attn.out_proj)]
        if cross:
            parts += [_norm(block.norm2, eps, refs), lin(block.cross_attn.q_proj),
                      lin(block.cross_attn.out_proj), _norm(block.norm3, eps, refs)]
        else:
            parts.append(_norm(block.norm2, eps, refs))
        parts += [lin(mlp.fc1), lin(mlp.fc2)]
        if any(p is None for p in parts):
            return None, refs
        layers.append(tuple(parts))
    final, head = _norm(final_norm, eps, refs), lin(model.lm_head)
    if final is None or head is None or not layers:
        return None, refs
    return _FORMATS[fmt][0]()(config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                           eps, layers, final, head), refs


# model -> (pack version, plan or None, refs); weak, so a plan never outlives its model,
# and kept off the module so that copying or pickling a model never meets it
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_plan(model):
    """The cached C++ step of an int8 or bf16 ``model`` (None if it has none)."""
    if Int8DecoderStep is None:
        return None
    version = quantize.pack_version()
    cached = _PLANS.get(model)
    if (cached is None or cached[0] != version
            or any(getattr(m, name) is not t for m, name, t in cached[2])):
        fmt = quantize.weight_format(model)
        if fmt in _FORMATS:
            plan, refs = _build(model, fmt)
        else:
            plan, refs = None, []
        cached = (version, plan, refs)
        _PLANS[model] = cached
    return cached[1]


def _cross_views(cross_kv, dtype):
    """numpy views of the per-layer cross K/V, or None when one is not dense ``dtype``."""
    ks, vs = [], []
    for k, v in cross_kv:
        if (k.dtype != dtype or v.dtype != dtype
                or not (k.is_contiguous() and v.is_contiguous())):
            return None
        ks.append(_bits(k.detach()))
        vs.append(_bits(v.detach()))
    return ks, vs


def run(plan, model, x: torch.Tensor, cache, cross_kv=None, encoder_mask=None):
    """Logits ``[R, vocab]`` of one step (``x``: the step's embeddings ``[R, 1, d]``, a
    fresh tensor that the step overwrites; ``cross_kv``/``encoder_mask`` for an
    encoder-decoder), or None when this step's inputs need the module path."""
    dtype = torch.bfloat16 if isinstance(plan, Bf16DecoderStep) else torch.float32
    if (model.training or x.dtype != dtype or x.shape[1] != 1
            or not x.is_contiguous() or cache.k.dtype != dtype
            or not cache.k.is_contiguous()
            or (encoder_mask is not None and encoder_mask.dtype != torch.bool)):
        return None
    views = ([], []) if cross_kv is None else _cross_views(cross_kv, dtype)
    if views is None:
        return None
    blocks, _, cross = _blocks(model)
    rope = (blocks[0].self_attn if cross else blocks[0].attn).rope
    head_dim = model.config.head_dim
    if rope.needs_positions_max():  # dynamic NTK: the base at this step's length
        base = rope.base(head_dim, int(cache.lens.max()) + 1)
    else:
        base = rope.base(head_dim)
    rows = x.shape[0]
    logits = torch.empty(rows, model.config.vocab_size, dtype=dtype)
    plan.step(_bits(x.detach().view(rows, -1)), _bits(cache.k), _bits(cache.v),
              cache.lens.numpy(), cache.lens_after.numpy(), cache.key_mask.numpy(), *views,
              None if encoder_mask is None else encoder_mask.contiguous().numpy(),
              float(base), _bits(logits), torch.get_num_threads())
    return logits
