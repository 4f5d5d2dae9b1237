"""Attention ops: validate inputs (DESIGN §2), then run the chosen backend."""

from __future__ import annotations

import torch

from . import dispatch, validate


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
    """Fused RoPE + GQA self-attention with autograd.

    ``q`` ``[B, L, Hq, D]``, ``k``/``v`` ``[B, L, Hkv, D]`` with ``Hq % Hkv == 0``
    (query head ``h`` reads K/V head ``h // (Hq // Hkv)``). ``causal``: query ``i``
    sees keys ``j <= i``. ``key_padding_mask``: bool ``[B, L]``, True = real token.
    ``positions``: int ``[B, L]`` or a start offset for RoPE (applied to q and k).
    ``scale`` defaults to ``1/sqrt(D)``. A query with no visible key returns zeros.
    """
    _, _, head_dim = validate.qkv(q, k, v, same_len=True)
    batch, seq_len = q.shape[0], q.shape[1]
    validate.key_padding_mask(key_padding_mask, batch, seq_len, q.device)
    validate.positions(positions, batch, seq_len, q.device)
    validate.scale(scale)
    if rope:
        validate.rope_head_dim("q", head_dim)
        validate.rope_scaling(rope_scaling_factor, max_position_embeddings)
    return dispatch.call(
        "self_attention", q, k, v,
        causal=bool(causal), key_padding_mask=key_padding_mask, positions=positions,
        rope_theta=rope_theta, rope=rope, scale=scale,
        rope_scaling_factor=rope_scaling_factor, max_position_embeddings=max_position_embeddings,
        device=q.device, needs_grad=dispatch.needs_grad(q, k, v),
        fallback_reason=_float64_reason(q),
    )


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decoder queries ``[B, Lq, Hq, D]`` against static encoder K/V ``[B, Lk, Hkv, D]``
    (no RoPE, ``Lq`` and ``Lk`` independent), optional encoder mask ``[B, Lk]``. Autograd."""
    validate.qkv(q, k, v, same_len=False)
    validate.key_padding_mask(key_padding_mask, q.shape[0], k.shape[1], q.device)
    validate.scale(scale)
    return dispatch.call(
        "cross_attention", q, k, v, key_padding_mask=key_padding_mask, scale=scale,
        device=q.device, needs_grad=dispatch.needs_grad(q, k, v),
        fallback_reason=_float64_reason(q),
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """``T`` new queries ``[B, T, Hq, D]`` against a preallocated cache ``[B, Lmax, Hkv, D]``.

    ``cache_seqlens`` (int ``[B]``) counts each row's valid cache entries, the ``T``
    new ones included; query ``t`` sees keys ``j <= cache_seqlens[b] - T + t``.
    """
    validate.qkv(q, k_cache, v_cache, k_name="k_cache", v_name="v_cache", same_len=False)
    validate.cache_seqlens(
        cache_seqlens, q.shape[0], k_cache.shape[1], q.shape[1], q.device,
        check_values=validate.can_read_values(cache_seqlens),
    )
    validate.scale(scale)
    return dispatch.call(
        "decode_attention", q, k_cache, v_cache, cache_seqlens, scale=scale,
        device=q.device, needs_grad=False, fallback_reason=_float64_reason(q),
    )


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
    """Rotate new ``q`` ``[B, T, Hq, D]`` and ``k`` ``[B, T, Hkv, D]`` at positions
    ``cache_seqlens[b] + t``, write ``k`` and ``v`` into the caches ``[B, Lmax, Hkv, D]``
    in place, return the rotated ``q``. The caller advances ``cache_seqlens`` by ``T``."""
    validate.qkv(q, k, v, same_len=True)
    validate.tensor("k_cache", k_cache, ndim=4, layout="[batch, max_len, n_kv_heads, head_dim]")
    validate.tensor("v_cache", v_cache, ndim=4, layout="[batch, max_len, n_kv_heads, head_dim]")
    validate.same_device(q=q, k_cache=k_cache, v_cache=v_cache)
    validate.same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ")
    batch, t_new, _, head_dim = q.shape
    if (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3]) != (batch, k.shape[2], head_dim):
        raise ValueError(
            f"k_cache must have shape [{batch}, max_len, {k.shape[2]}, {head_dim}], "
            f"got {list(k_cache.shape)}"
        )
    lmax = k_cache.shape[1]
    validate.cache_seqlens(
        cache_seqlens, batch, lmax, t_new, q.device,
        check_values=validate.can_read_values(cache_seqlens),
    )
    if validate.can_read_values(cache_seqlens) and cache_seqlens.numel():
        if int(cache_seqlens.max()) + t_new > lmax:
            raise ValueError(
                f"cache_seqlens + {t_new} new tokens exceeds the cache length {lmax}"
            )
    if rope:
        validate.rope_head_dim("q", head_dim)
        validate.rope_scaling(rope_scaling_factor, max_position_embeddings)
    return dispatch.call(
        "append_kv_cache", q, k, v, k_cache, v_cache, cache_seqlens,
        rope=rope, rope_theta=rope_theta, rope_scaling_factor=rope_scaling_factor,
        max_position_embeddings=max_position_embeddings,
        device=q.device, needs_grad=False, fallback_reason=_float64_reason(q),
    )


def _float64_reason(t: torch.Tensor) -> str | None:
    return "float64 inputs have no kernel" if t.dtype == torch.float64 else None
