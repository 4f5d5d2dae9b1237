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

import torch

from . import packed_plan
from .layers import GeluMLP
from .packed_plan import bits as _bits

try:
    from fastencdec._C import Bf16DecoderStep, Int8DecoderStep
except ImportError:  # pragma: no cover - the compiled module is part of the package
    Bf16DecoderStep = Int8DecoderStep = None


def _blocks(model):
    """(decoder blocks, final norm, whether they cross-attend) of either architecture."""
    if getattr(model, "is_encoder_decoder", False):
        return model.decoder, model.decoder_norm, True
    return model.layers, model.norm, False


def _build(model, fmt: str):
    """(the C++ step for ``model`` in ``fmt`` or None when its structure does not fit,
    the (module, attribute, tensor) triples whose replacement makes it stale)."""
    config = model.config
    lin = lambda module: packed_plan.linear(module, fmt, refs)  # noqa: E731
    nrm = lambda module: packed_plan.norm(module, config.norm_eps, refs)  # noqa: E731
    blocks, final_norm, cross = _blocks(model)
    layers, refs = [], []
    for block in blocks:
        attn, mlp = (block.self_attn if cross else block.attn), block.mlp
        qkv = attn._modules.get("qkv_proj")
        if not isinstance(mlp, GeluMLP) or not packed_plan.fused_gelu(mlp.fc1, refs):
            return None, refs
        parts = [nrm(block.norm1), lin(qkv), lin(attn.out_proj)]
        if cross:
            parts += [nrm(block.norm2), lin(block.cross_attn.q_proj),
                      lin(block.cross_attn.out_proj), nrm(block.norm3)]
        else:
            parts.append(nrm(block.norm2))
        parts += [lin(mlp.fc1), lin(mlp.fc2)]
        if any(p is None for p in parts):
            return None, refs
        layers.append(tuple(parts))
    final, head = nrm(final_norm), lin(model.lm_head)
    if final is None or head is None or not layers:
        return None, refs
    step = Int8DecoderStep if fmt == "int8" else Bf16DecoderStep
    return step(config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                config.norm_eps, layers, final, head), refs


def step_plan(model):
    """The cached C++ step of an int8 or bf16 ``model`` (None if it has none)."""
    if Int8DecoderStep is None:
        return None
    return packed_plan.cached(model, "decoder_step", _build)


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
