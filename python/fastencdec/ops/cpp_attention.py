"""Attention ops on the C++ CPU kernels (inference, forward only).

Same signatures, contracts and results as :mod:`fastencdec.reference.attention`.
Storage may be fp32, bf16 or fp16 (compute is fp32; bf16/fp16 are widened in
registers). Tensors are handed to C++ as zero-copy numpy views (bf16/fp16 as
``uint16`` views of their bits) and outputs are allocated here with
``torch.empty`` and filled in place; a non-contiguous q/k/v/cache is first made
contiguous (one copy). KV caches that ``append_kv_cache`` writes must be
contiguous, otherwise the op falls back to the reference. float64 inputs fall
back to the reference too (``unsupported`` hooks, see ``dispatch.call``).
"""

from __future__ import annotations

import math

import torch

from ..reference.rope import rope_base

__all__ = ["self_attention", "cross_attention", "decode_attention", "append_kv_cache"]

_STORAGE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _C():
    from fastencdec import _C

    return _C


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


def _view(t: torch.Tensor):
    """Zero-copy numpy view of a contiguous CPU tensor (bf16/fp16 as uint16 bits)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.uint16).numpy()
    return t.numpy()


def _cache_view(cache: torch.Tensor):
    """A cache is written in place: it must be contiguous already (no copy)."""
    if not cache.is_contiguous():
        raise ValueError("append_kv_cache: the C++ kernel writes caches in place and needs "
                         "contiguous k_cache/v_cache")
    return _view(cache.detach() if cache.requires_grad else cache)


def _mask(mask):
    return None if mask is None else _contiguous(mask).numpy()


def _scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _index(t: torch.Tensor) -> torch.Tensor:
    """int64 or int32 (the C++ side takes both), contiguous."""
    if t.dtype not in (torch.int64, torch.int32):
        t = t.to(torch.int64)
    return _contiguous(t)


def _positions(positions, seq_len: int) -> torch.Tensor:
    """Integer ``[1, L]`` for an offset (shared by the batch) or ``[B, L]``."""
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:
        return _index(positions)
    start = 0 if positions is None else int(positions)
    return torch.arange(start, start + seq_len, dtype=torch.int64).view(1, seq_len)


def _rope_base(theta, head_dim, max_position, scaling_factor, max_position_embeddings) -> float:
    """``rope_base`` at ``seq_len = max_position + 1``; the maximum (a sync on the
    positions) is only taken when NTK scaling needs it."""
    if scaling_factor <= 1.0:
        return float(theta)
    return rope_base(theta, head_dim, int(max_position()) + 1, scaling_factor,
                     max_position_embeddings)


def self_attention(
    q,
    k,
    v,
    *,
    causal,
    key_padding_mask=None,
    positions=None,
    rope_theta=10000.0,
    rope=True,
    scale=None,
    rope_scaling_factor=1.0,
    max_position_embeddings=None,
):
    """Fused RoPE + GQA self-attention (see ``fastencdec.reference.self_attention``).

    RoPE is applied to q and k tiles as they are loaded; cos/sin are computed once
    per call. The effective (NTK-scaled) RoPE base comes from ``rope_base``."""
    _, seq_len, _, head_dim = q.shape
    q, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
    out = torch.empty_like(q)
    pos_view, base = None, 0.0
    if rope:
        pos = _positions(positions, seq_len)
        base = _rope_base(rope_theta, head_dim, pos.max, rope_scaling_factor,
                          max_position_embeddings)
        pos_view = pos.numpy()
    _C().self_attention(
        _view(q), _view(k), _view(v), _view(out), _mask(key_padding_mask), pos_view,
        bool(causal), _scale(scale, head_dim), float(base), _STORAGE[q.dtype],
        torch.get_num_threads(),
    )
    return out


def cross_attention(q, k, v, *, key_padding_mask=None, scale=None):
    """Queries ``[B, Lq, Hq, D]`` over static encoder K/V ``[B, Lk, Hkv, D]`` (no RoPE)."""
    q, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
    out = torch.empty_like(q)
    _C().cross_attention(
        _view(q), _view(k), _view(v), _view(out), _mask(key_padding_mask),
        _scale(scale, q.shape[-1]), _STORAGE[q.dtype], torch.get_num_threads(),
    )
    return out


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None):
    """``T`` new queries against a preallocated KV cache with per-row lengths
    (bottom-right causal). A contiguous cache is read in place."""
    q, k_cache, v_cache = _contiguous(q), _contiguous(k_cache), _contiguous(v_cache)
    out = torch.empty_like(q)
    _C().decode_attention(
        _view(q), _view(k_cache), _view(v_cache), _index(cache_seqlens).numpy(), _view(out),
        _scale(scale, q.shape[-1]), _STORAGE[q.dtype], torch.get_num_threads(),
    )
    return out


def append_kv_cache(
    q,
    k,
    v,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    rope=True,
    rope_theta=10000.0,
    rope_scaling_factor=1.0,
    max_position_embeddings=None,
):
    """Rotate new q/k at positions ``cache_seqlens[b] + t``, write k and v into the
    (contiguous) caches in place, return the rotated q (q itself without RoPE)."""
    _, t_new, _, head_dim = q.shape
    q_in, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
    lens = _index(cache_seqlens)
    q_out, base = None, 0.0
    if rope:
        base = _rope_base(rope_theta, head_dim, lambda: lens.max() + (t_new - 1),
                          rope_scaling_factor, max_position_embeddings)
        q_out = torch.empty_like(q_in)
    _C().append_kv_cache(
        _view(q_in), _view(k), _view(v), _cache_view(k_cache), _cache_view(v_cache),
        lens.numpy(), None if q_out is None else _view(q_out), bool(rope), float(base),
        _STORAGE[q.dtype], torch.get_num_threads(),
    )
    return q if q_out is None else q_out


def _unsupported_dtype(q, *args, **kwargs) -> str | None:
    if q.dtype not in _STORAGE:
        return f"{q.dtype} inputs have no C++ kernel"
    return None


def _unsupported_append(q, k, v, k_cache, v_cache, *args, **kwargs) -> str | None:
    reason = _unsupported_dtype(q)
    if reason is None and not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        reason = "non-contiguous KV caches (written in place) have no C++ kernel"
    return reason


self_attention.unsupported = _unsupported_dtype
cross_attention.unsupported = _unsupported_dtype
decode_attention.unsupported = _unsupported_dtype
append_kv_cache.unsupported = _unsupported_append
