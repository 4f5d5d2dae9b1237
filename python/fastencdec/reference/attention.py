"""Attention, plain PyTorch: the ground truth for the Triton and C++ kernels.

Layout is ``[batch, seq, heads, head_dim]`` (DESIGN §2). K/V heads are shared by
groups of query heads: query head ``h`` reads K/V head ``h // (Hq // Hkv)``.
Everything is computed in the inputs' dtype promoted to at least fp32 (float64
stays float64), with an explicit ``[B, H, Lq, Lk]`` score matrix: clarity over speed.
"""

from __future__ import annotations

import math

import torch

from .rope import apply_rope

__all__ = ["self_attention", "cross_attention", "decode_attention", "append_kv_cache"]


def _expand_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """``[B, L, Hkv, D]`` -> ``[B, L, Hq, D]`` with head ``h`` taken from ``h // group``."""
    group = n_q_heads // x.shape[2]
    return x.repeat_interleave(group, dim=2)


def attention_with_mask(q, k, v, allowed: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Softmax attention where ``allowed`` (bool, broadcastable to ``[B, Lq, Lk]``) says
    which keys each query may see. A query with no allowed key returns zeros and
    passes zero gradient (never NaN); keys that no query may see are not read."""
    out_dtype = q.dtype
    compute = torch.promote_types(q.dtype, torch.float32)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    allowed = allowed.expand(q.shape[0], q.shape[1], k.shape[1])
    # Keys no query may see (padding, cache rows past the length) are never read:
    # whatever they hold (NaN from an uninitialised cache) must not reach the output.
    key_used = allowed.any(dim=1)[:, :, None, None]  # [B, Lk, 1, 1]
    k = torch.where(key_used, k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(key_used, v, torch.zeros((), dtype=v.dtype, device=v.device))
    qh = q.to(compute).transpose(1, 2)  # [B, H, Lq, D]
    kh = _expand_kv(k, q.shape[2]).to(compute).transpose(1, 2)
    vh = _expand_kv(v, q.shape[2]).to(compute).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    allowed = allowed.unsqueeze(1)  # [B, 1, Lq, Lk]
    row_has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows with no key: softmax over zeros, then multiplied by 0, keeps grads finite.
    scores = scores.masked_fill(~row_has_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_has_key
    out = torch.matmul(probs, vh)  # [B, H, Lq, D]
    return out.transpose(1, 2).to(out_dtype)


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    positions=None,
    rope_theta: float = 10000.0,
    rope: bool = True,
    scale: float | None = None,
    rope_scaling_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """RoPE + GQA self-attention. ``q`` ``[B, L, Hq, D]``, ``k``/``v`` ``[B, L, Hkv, D]``.

    ``positions``: int ``[B, L]`` or a start offset (default 0), applied to q and k.
    ``causal``: query ``i`` sees keys ``j <= i``. ``key_padding_mask``: bool ``[B, L]``,
    True = real token.
    """
    batch, seq_len = q.shape[0], q.shape[1]
    if rope:
        rope_kw = dict(
            theta=rope_theta,
            scaling_factor=rope_scaling_factor,
            max_position_embeddings=max_position_embeddings,
        )
        q = apply_rope(q, positions, **rope_kw)
        k = apply_rope(k, positions, **rope_kw)
    allowed = torch.ones(batch, seq_len, seq_len, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return attention_with_mask(q, k, v, allowed, scale)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decoder queries ``[B, Lq, Hq, D]`` against static encoder K/V ``[B, Lk, Hkv, D]``:
    no RoPE, no causality, optional encoder padding mask ``[B, Lk]``."""
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    allowed = torch.ones(batch, lq, lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return attention_with_mask(q, k, v, allowed, scale)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Queries ``[B, T, Hq, D]`` against a preallocated cache ``[B, Lmax, Hkv, D]``.

    ``cache_seqlens[b]`` counts the valid cache rows of batch row ``b``, the ``T``
    new tokens included. Causal, aligned bottom-right: query ``t`` sees keys
    ``j < len`` with ``j <= len - T + t``. Keys in the cache are already rotated.
    """
    batch, t_new, lmax = q.shape[0], q.shape[1], k_cache.shape[1]
    lens = cache_seqlens.to(device=q.device, dtype=torch.int64).view(batch, 1, 1)
    key_idx = torch.arange(lmax, device=q.device).view(1, 1, lmax)
    query_idx = torch.arange(t_new, device=q.device).view(1, t_new, 1)
    allowed = (key_idx < lens) & (key_idx <= lens - t_new + query_idx)
    return attention_with_mask(q, k_cache, v_cache, allowed, scale)


def append_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    rope: bool = True,
    rope_theta: float = 10000.0,
    rope_scaling_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """One decode step's cache update: rotate the new ``q``/``k`` ``[B, T, H*, D]`` at
    positions ``cache_seqlens[b] + t``, write rotated ``k`` and ``v`` into rows
    ``cache_seqlens[b] .. + T`` of the caches (in place) and return the rotated ``q``.
    ``cache_seqlens`` is left unchanged: the caller advances it by ``T``."""
    batch, t_new = q.shape[0], q.shape[1]
    start = cache_seqlens.to(device=q.device, dtype=torch.int64).view(batch, 1)
    positions = start + torch.arange(t_new, device=q.device).view(1, t_new)
    if rope:
        rope_kw = dict(
            theta=rope_theta,
            scaling_factor=rope_scaling_factor,
            max_position_embeddings=max_position_embeddings,
        )
        q = apply_rope(q, positions, **rope_kw)
        k = apply_rope(k, positions, **rope_kw)
    rows = torch.arange(batch, device=q.device).view(batch, 1).expand(batch, t_new)
    k_cache[rows, positions] = k.to(k_cache.dtype)
    v_cache[rows, positions] = v.to(v_cache.dtype)
    return q
