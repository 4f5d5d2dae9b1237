"""Attention, plain PyTorch: the ground truth for the Triton and C++ kernels.

Layout is ``[batch, seq, heads, head_dim]`` (DESIGN §2). K/V heads are shared by
groups of query heads: query head ``h`` reads K/V head ``h // (Hq // Hkv)``.
Everything is computed in the inputs' dtype promoted to at least fp32 (float64
stays float64), with an explicit ``[B, H, Lq, Lk]`` score matrix: clarity over speed.
"""

from __future__ import annotations

import math

import torch

from ..constants import LOG2E
from ..spec import Rope, as_rope
from .rope import rotate

__all__ = ["self_attention", "cross_attention", "decode_attention", "append_kv_cache",
           "attention_with_mask", "self_attention_with_lse", "cross_attention_with_lse",
           "attention_backward", "attention_grads_with_mask"]


def _expand_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """``[B, L, Hkv, D]`` -> ``[B, L, Hq, D]`` with head ``h`` taken from ``h // group``."""
    group = n_q_heads // x.shape[2]
    return x.repeat_interleave(group, dim=2)


def attention_with_mask(q, k, v, allowed: torch.Tensor, scale: float | None, *,
                        with_lse: bool = False):
    """Softmax attention where ``allowed`` (bool, broadcastable to ``[B, Lq, Lk]``) says
    which keys each query may see. A query with no allowed key returns zeros and
    passes zero gradient (never NaN); keys that no query may see are not read.

    ``with_lse``: also return each row's base-2 log-sum-exp of its visible scaled
    scores, ``log2 sum_j exp(scale * q.k_j)`` (the kernels' convention), ``[B, Hq, Lq]``
    float32, ``+inf`` for a row with no visible key."""
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
    out = torch.matmul(probs, vh).transpose(1, 2).to(out_dtype).contiguous()  # [B, Lq, H, D]
    if not with_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1) * LOG2E  # natural log -> log2
    lse = lse.masked_fill(~row_has_key.squeeze(-1), float("inf"))
    return out, lse.to(torch.float32)


def attention_grads_with_mask(grad_out, q, k, v, allowed: torch.Tensor, scale: float | None):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_with_mask` for the output gradient
    ``grad_out`` ``[B, Lq, Hq, D]``, written out (the flash-attention backward)::

        P = softmax(S),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),
        dQ = scale * dS K,  dK = scale * dS^T Q

    with the K/V gradients of a group's query heads summed into their shared head.
    Keys no query may see get exactly zero gradient."""
    compute = torch.promote_types(q.dtype, torch.float32)
    head_dim, n_heads, n_kv = q.shape[-1], q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    allowed = allowed.expand(q.shape[0], q.shape[1], k.shape[1])
    key_used = allowed.any(dim=1)[:, :, None, None]
    k = torch.where(key_used, k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(key_used, v, torch.zeros((), dtype=v.dtype, device=v.device))
    qh = q.to(compute).transpose(1, 2)
    kh = _expand_kv(k, n_heads).to(compute).transpose(1, 2)
    vh = _expand_kv(v, n_heads).to(compute).transpose(1, 2)
    d_out = grad_out.to(compute).transpose(1, 2)
    allowed = allowed.unsqueeze(1)
    row_has_key = allowed.any(dim=-1, keepdim=True)
    scores = (torch.matmul(qh, kh.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.masked_fill(~row_has_key, 0.0), dim=-1) * row_has_key
    dv = torch.matmul(probs.transpose(-1, -2), d_out)
    dp = torch.matmul(d_out, vh.transpose(-1, -2))
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kh) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qh) * scale

    def per_kv_head(g):  # [B, Hq, Lk, D] -> [B, Lk, Hkv, D], summing each group
        batch, _, len_k, dim = g.shape
        return g.view(batch, n_kv, n_heads // n_kv, len_k, dim).sum(2).transpose(1, 2)

    return (dq.transpose(1, 2).to(q.dtype).contiguous(),
            per_kv_head(dk).to(k.dtype).contiguous(), per_kv_head(dv).to(v.dtype).contiguous())


def _self_attention_mask(batch, seq_len, causal, key_padding_mask, device):
    allowed = torch.ones(batch, seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return allowed


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   key_padding_mask: torch.Tensor | None = None, positions=None,
                   rope_theta: float = 10000.0, rope: bool | Rope = True,
                   scale: float | None = None, rope_scaling_factor: float = 1.0,
                   max_position_embeddings: int | None = None, with_lse: bool = False):
    """RoPE + GQA self-attention. ``q`` ``[B, L, Hq, D]``, ``k``/``v`` ``[B, L, Hkv, D]``.

    ``positions``: int ``[B, L]`` or a start offset (default 0), applied to q and k.
    ``causal``: query ``i`` sees keys ``j <= i``. ``key_padding_mask``: bool ``[B, L]``,
    True = real token. ``rope``: a ``Rope``, or True with the loose ``rope_*`` settings.
    ``with_lse``: also return the log-sum-exp (see :func:`attention_with_mask`).
    """
    spec = as_rope(rope, rope_theta, rope_scaling_factor, max_position_embeddings)
    if spec is not None:
        q, k = rotate(q, positions, spec), rotate(k, positions, spec)
    allowed = _self_attention_mask(q.shape[0], q.shape[1], causal, key_padding_mask, q.device)
    return attention_with_mask(q, k, v, allowed, scale, with_lse=with_lse)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    with_lse: bool = False,
):
    """Decoder queries ``[B, Lq, Hq, D]`` against static encoder K/V ``[B, Lk, Hkv, D]``:
    no RoPE, no causality, optional encoder padding mask ``[B, Lk]``."""
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    allowed = torch.ones(batch, lq, lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return attention_with_mask(q, k, v, allowed, scale, with_lse=with_lse)


def self_attention_with_lse(q, k, v, **kwargs):
    """:func:`self_attention` returning ``(out, lse)``."""
    return self_attention(q, k, v, with_lse=True, **kwargs)


def cross_attention_with_lse(q, k, v, **kwargs):
    """:func:`cross_attention` returning ``(out, lse)``."""
    return cross_attention(q, k, v, with_lse=True, **kwargs)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Queries ``[B, T, Hq, D]`` against a preallocated cache ``[B, Lmax, Hkv, D]``.

    ``cache_seqlens[b]`` counts the valid cache rows of batch row ``b``, the ``T``
    new tokens included. Causal, aligned bottom-right: query ``t`` sees keys
    ``j < len`` with ``j <= len - T + t``, and only keys with ``key_padding_mask[b, j]``
    when a mask ``[B, Lmax]`` is given. Keys in the cache are already rotated.
    """
    batch, t_new, lmax = q.shape[0], q.shape[1], k_cache.shape[1]
    lens = cache_seqlens.to(device=q.device, dtype=torch.int64).view(batch, 1, 1)
    key_idx = torch.arange(lmax, device=q.device).view(1, 1, lmax)
    query_idx = torch.arange(t_new, device=q.device).view(1, t_new, 1)
    allowed = (key_idx < lens) & (key_idx <= lens - t_new + query_idx)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return attention_with_mask(q, k_cache, v_cache, allowed, scale)


def append_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
                    rope: bool | Rope = True, rope_theta: float = 10000.0,
                    rope_scaling_factor: float = 1.0,
                    max_position_embeddings: int | None = None) -> torch.Tensor:
    """One decode step's cache update: rotate the new ``q``/``k`` ``[B, T, H*, D]`` at
    positions ``cache_seqlens[b] + t``, write rotated ``k`` and ``v`` into rows
    ``cache_seqlens[b] .. + T`` of the caches (in place) and return the rotated ``q``
    (a new tensor, also without RoPE). The NTK length is ``max(cache_seqlens) + T``
    unless the ``Rope`` fixes it. ``cache_seqlens`` is left unchanged: the caller
    advances it by ``T``."""
    batch, t_new = q.shape[0], q.shape[1]
    start = cache_seqlens.to(device=q.device, dtype=torch.int64).view(batch, 1)
    positions = start + torch.arange(t_new, device=q.device).view(1, t_new)
    spec = as_rope(rope, rope_theta, rope_scaling_factor, max_position_embeddings)
    if spec is not None:
        q, k = rotate(q, positions, spec), rotate(k, positions, spec)
    else:
        q = q.clone()
    rows = torch.arange(batch, device=q.device).view(batch, 1).expand(batch, t_new)
    k_cache[rows, positions] = k.to(k_cache.dtype)
    v_cache[rows, positions] = v.to(v_cache.dtype)
    return q


def attention_backward(grad_out, q, k, v, *, causal: bool = False, key_padding_mask=None,
                       positions=None, rope: Rope | None = None, scale: float | None = None):
    """Gradients ``(dq, dk, dv)`` of :func:`self_attention` (``causal`` and/or ``rope``
    given) or :func:`cross_attention` (neither) w.r.t. q/k/v *before* RoPE: the
    gradients of the rotated tensors turned back by the inverse rotation."""
    if causal or rope is not None:
        if rope is not None:
            q, k = rotate(q, positions, rope), rotate(k, positions, rope)
        allowed = _self_attention_mask(q.shape[0], q.shape[1], causal, key_padding_mask,
                                       q.device)
    else:
        allowed = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool,
                             device=q.device)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, :]
    dq, dk, dv = attention_grads_with_mask(grad_out, q, k, v, allowed, scale)
    if rope is not None:
        dq = rotate(dq, positions, rope, inverse=True)
        dk = rotate(dk, positions, rope, inverse=True)
    return dq, dk, dv
