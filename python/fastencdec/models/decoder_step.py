"""The int8 decode step in one C++ call (``_C.Int8DecoderStep``), for encoder-decoder
and decoder-only models.

Called module by module from Python, a batch-1 mu-330m int8 decode step spent ~40% of
its time between the kernels (module calls, op wrappers, views). For a model converted
by ``to_inference(model, "int8")`` (fused QKV, GELU in fc1's epilogue) the whole
decoder -- norms, projections, RoPE + cache append, cache attention, cross-attention
(encoder-decoder), MLP, residuals, final norm and LM head -- runs as one call to the
same kernels in the same order, so the logits equal the module path's bitwise (tested).

``step_plan(model)`` returns the plan, or None when the model is not such a model; the
plan is rebuilt when any int8 weight is packed again (``pack``/``load_state_dict``) or
a norm weight or bias is replaced, and reads the norm weights and biases in place
(in-place updates are seen).
``EncoderDecoderLM.decode_step`` and ``DecoderOnlyLM.decode_step`` use it for
one-token steps of fp32 activations;
everything else (training mode, several tokens per step, dynamic-NTK recomputation)
takes the module path.
"""

from __future__ import annotations

import weakref

import torch

from . import quantize
from .layers import GeluMLP, RMSNorm

try:
    from fastencdec._C import Int8DecoderStep
except ImportError:  # pragma: no cover - the compiled module is part of the package
    Int8DecoderStep = None


def _linear(module, refs: list) -> tuple | None:
    if not isinstance(module, quantize.Int8Linear) or module._packed is None:
        return None
    panels, row_sums, scale = module._packed["args"]
    bias = module.bias
    refs.append((module, "bias", bias))
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    return panels, row_sums, scale, None if bias is None else bias.detach().numpy()


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


def _build(model):
    """(the C++ step for ``model`` or None when its structure does not fit, the
    (module, attribute, tensor) triples whose replacement makes it stale)."""
    config = model.config
    eps = config.norm_eps
    blocks, final_norm, cross = _blocks(model)
    layers, refs = [], []
    for block in blocks:
        attn, mlp = (block.self_attn if cross else block.attn), block.mlp
        qkv = attn._modules.get("qkv_proj")
        if not isinstance(mlp, GeluMLP) or getattr(mlp.fc1, "activation", None) != "gelu_tanh":
            return None, refs
        parts = [_norm(block.norm1, eps, refs), _linear(qkv, refs), _linear(attn.out_proj, refs)]
        if cross:
            parts += [_norm(block.norm2, eps, refs), _linear(block.cross_attn.q_proj, refs),
                      _linear(block.cross_attn.out_proj, refs), _norm(block.norm3, eps, refs)]
        else:
            parts.append(_norm(block.norm2, eps, refs))
        parts += [_linear(mlp.fc1, refs), _linear(mlp.fc2, refs)]
        if any(p is None for p in parts):
            return None, refs
        layers.append(tuple(parts))
    final, head = _norm(final_norm, eps, refs), _linear(model.lm_head, refs)
    if final is None or head is None or not layers:
        return None, refs
    return Int8DecoderStep(config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                           eps, layers, final, head), refs


# model -> (pack version, plan or None, refs); weak, so a plan never outlives its model,
# and kept off the module so that copying or pickling a model never meets it
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_plan(model):
    """The cached C++ step of an int8 ``model`` (None if it has none)."""
    if Int8DecoderStep is None:
        return None
    version = quantize.pack_version()
    cached = _PLANS.get(model)
    if (cached is None or cached[0] != version
            or any(getattr(m, name) is not t for m, name, t in cached[2])):
        if quantize.weight_format(model) == "int8":
            plan, refs = _build(model)
        else:
            plan, refs = None, []
        cached = (version, plan, refs)
        _PLANS[model] = cached
    return cached[1]


def _cross_views(cross_kv):
    """numpy views of the per-layer cross K/V, or None when one is not dense fp32."""
    ks, vs = [], []
    for k, v in cross_kv:
        if k.dtype != torch.float32 or not (k.is_contiguous() and v.is_contiguous()):
            return None
        ks.append(k.detach().numpy())
        vs.append(v.detach().numpy())
    return ks, vs


def run(plan, model, x: torch.Tensor, cache, cross_kv=None, encoder_mask=None):
    """Logits ``[R, vocab]`` of one step (``x``: the step's embeddings ``[R, 1, d]``, a
    fresh tensor that the step overwrites; ``cross_kv``/``encoder_mask`` for an
    encoder-decoder), or None when this step's inputs need the module path."""
    if (model.training or x.dtype != torch.float32 or x.shape[1] != 1
            or not x.is_contiguous() or cache.k.dtype != torch.float32
            or not cache.k.is_contiguous()
            or (encoder_mask is not None and encoder_mask.dtype != torch.bool)):
        return None
    views = ([], []) if cross_kv is None else _cross_views(cross_kv)
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
    logits = torch.empty(rows, model.config.vocab_size)
    plan.step(x.detach().view(rows, -1).numpy(), cache.k.numpy(), cache.v.numpy(),
              cache.lens.numpy(), cache.lens_after.numpy(), cache.key_mask.numpy(), *views,
              None if encoder_mask is None else encoder_mask.contiguous().numpy(),
              float(base), logits.numpy(), torch.get_num_threads())
    return logits
