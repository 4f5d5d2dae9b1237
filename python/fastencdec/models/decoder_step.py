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


def _structure(model) -> tuple[str, str, bool]:
    """(attribute of the decoder blocks, of the final norm, whether they cross-attend)."""
    if getattr(model, "is_encoder_decoder", False):
        return "decoder", "decoder_norm", True
    return "layers", "norm", False


def _build(model, fmt: str):
    """(the C++ step for ``model`` in ``fmt`` or None when its structure does not fit,
    the Refs whose change makes it stale)."""
    config, eps = model.config, model.config.norm_eps
    refs = packed_plan.Refs()
    blocks, final_norm, cross = _structure(model)
    layers = []
    for block in refs.items(refs.get(model, blocks)):
        attn = refs.get(block, "self_attn" if cross else "attn")
        mlp = refs.get(block, "mlp")
        if refs.get(attn, "causal") is not True or not isinstance(mlp, GeluMLP):
            return None, refs
        parts = [packed_plan.norm(block, "norm1", eps, refs),
                 packed_plan.linear(attn, "qkv_proj", fmt, refs),
                 packed_plan.linear(attn, "out_proj", fmt, refs)]
        if cross:
            cross_attn = refs.get(block, "cross_attn")
            parts += [packed_plan.norm(block, "norm2", eps, refs),
                      packed_plan.linear(cross_attn, "q_proj", fmt, refs),
                      packed_plan.linear(cross_attn, "out_proj", fmt, refs),
                      packed_plan.norm(block, "norm3", eps, refs)]
        else:
            parts.append(packed_plan.norm(block, "norm2", eps, refs))
        parts += [packed_plan.linear(mlp, "fc1", fmt, refs, "gelu_tanh"),
                  packed_plan.linear(mlp, "fc2", fmt, refs)]
        if any(p is None for p in parts):
            return None, refs
        layers.append(tuple(parts))
    final = packed_plan.norm(model, final_norm, eps, refs)
    head = packed_plan.linear(model, "lm_head", fmt, refs)
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
    if packed_plan.module_path_needed(model, "decoder_step", x):
        return None
    blocks, _, cross = _structure(model)
    blocks = getattr(model, blocks)
    if (x.dtype != dtype or x.shape[1] != 1
            or not x.is_contiguous() or cache.k.dtype != dtype
            or not cache.k.is_contiguous()
            or (encoder_mask is not None and encoder_mask.dtype != torch.bool)):
        return None
    views = ([], []) if cross_kv is None else _cross_views(cross_kv, dtype)
    if views is None:
        return None
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
