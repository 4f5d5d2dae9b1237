"""A decoder-only int8 / bf16 model's prompt in one C++ call (``prefill`` of
``_C.Int8Blocks`` / ``_C.Bf16Blocks``): every layer's norms, projections, causal RoPE
attention with the padding mask, KV-cache writes, MLP and residuals, with the module
path's kernels in its order (``Block.prefill``), so the cache and the next-token logits
equal the module path's bitwise (tested); as the encoder-decoder's one-call encoder
(``encoder_pass``), it saves what lies between the kernels. The attention's products
stay fp32 here: the decoding steps recompute nothing, so the prompt's keys must be those
the module path would cache.

``DecoderOnlyLM.prefill`` calls :func:`run`, which returns None whenever the module path
must run instead (training mode, gradients, tracing, forward hooks on the layers, a
forced backend other than the C++ one, a cache of another dtype or depth, or a model
this path does not cover).
"""

from __future__ import annotations

import torch

from . import packed_plan


def plan(model):
    """The cached C++ blocks of an int8 or bf16 decoder-only model (None if it has none)."""
    if getattr(model, "is_encoder_decoder", True):
        return None
    return packed_plan.cached(model, "prefill", lambda m, fmt: packed_plan.build_blocks(
        m, fmt, "layers", "norm", causal=True))


def run(model, x: torch.Tensor, mask: torch.Tensor | None, cache):
    """The last layer's residual stream ``[B, L, d]`` (before the final norm) of the
    embedded prompts ``x`` (real tokens first), having written layers' rotated keys and
    values into ``cache``; or None when the module path must run."""
    if model.training or torch.compiler.is_compiling():
        return None
    blocks = plan(model)
    if blocks is None or packed_plan.module_path_needed(model, "prefill", x):
        return None
    dtype = packed_plan.activation_dtype(blocks)
    if (x.dtype != dtype or x.device.type != "cpu" or cache.k.dtype != dtype
            or not (cache.k.is_contiguous() and cache.v.is_contiguous())
            or cache.k.shape[0] != blocks.n_layers
            or (mask is not None and mask.dtype != torch.bool)):
        return None
    seq_len = x.shape[1]
    rope = model.layers[0].attn.rope
    head_dim = model.config.head_dim
    base = (rope.base(head_dim, seq_len) if rope.needs_positions_max()
            else rope.base(head_dim))
    x = x.detach().contiguous()
    states = torch.empty_like(x)
    bits = packed_plan.bits
    blocks.prefill(bits(x), None if mask is None else mask.contiguous().numpy(), float(base),
                   bits(cache.k), bits(cache.v), bits(states), torch.get_num_threads())
    return states
