"""Attention ops (DESIGN §3): check the inputs once, resolve defaults into the
canonical arguments of ``ops/schema.py``, then run.

Eager inference calls the backend chosen by ``dispatch`` directly (no per-call
overhead beyond the checks); autograd and ``torch.compile``/``torch.export`` go
through the custom ops ``fastencdec::*`` (``ops/library.py``), which run the same
backends.
"""

from __future__ import annotations

import math

import torch

from ..spec import Rope, as_rope
from . import dispatch, library, validate

__all__ = ["self_attention", "cross_attention", "decode_attention", "append_kv_cache"]


def _deterministic(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"deterministic must be a bool, got {type(value).__name__}")
    return value


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _run(op: str, args: tuple):
    if torch.compiler.is_compiling():
        return library.call(op, *args)
    x = args[0]
    return dispatch.run(op, "cpu" if x.is_cpu else x.device.type, *args)


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    positions=None,
    rope_theta: float = 10000.0,
    rope: bool | Rope = True,
    scale: float | None = None,
    rope_scaling_factor: float = 1.0,
    max_position_embeddings: int | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Fused RoPE + GQA self-attention with autograd.

    ``q`` ``[B, L, Hq, D]``, ``k``/``v`` ``[B, L, Hkv, D]`` with ``Hq % Hkv == 0``
    (query head ``h`` reads K/V head ``h // (Hq // Hkv)``). ``causal``: query ``i``
    sees keys ``j <= i``. ``key_padding_mask``: bool ``[B, L]``, True = real token.
    ``positions``: int ``[B, L]`` or a start offset for RoPE (applied to q and k).
    ``rope``: a :class:`fastencdec.Rope`, True (built from ``rope_theta``,
    ``rope_scaling_factor``, ``max_position_embeddings``) or False (no RoPE).
    ``scale`` defaults to ``1/sqrt(D)``. A query with no visible key returns zeros.
    ``deterministic=False`` lets the backward accumulate dQ with atomics (faster on a
    GPU; the last bits of dQ then vary between runs).
    """
    head_dim = validate.qkv(q, k, v, same_len=True)
    batch, seq_len = q.shape[0], q.shape[1]
    validate.key_padding_mask(key_padding_mask, batch, seq_len, q.device)
    pos, offset = validate.positions(positions, batch, seq_len, q.device)
    spec = as_rope(rope, rope_theta, rope_scaling_factor, max_position_embeddings)
    validate.rope(spec, head_dim)
    args = (q, k, v, key_padding_mask, pos, offset, bool(causal),
            validate.scale(scale, head_dim), spec)
    if _needs_grad(q, k, v):
        return library.call("self_attention_with_lse", *args,
                            _deterministic(deterministic))[0]
    return _run("self_attention", args)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Decoder queries ``[B, Lq, Hq, D]`` against static encoder K/V ``[B, Lk, Hkv, D]``
    (no RoPE, ``Lq`` and ``Lk`` independent), optional encoder mask ``[B, Lk]``. Autograd;
    ``deterministic`` as in :func:`self_attention`."""
    head_dim = validate.qkv(q, k, v, same_len=False)
    if key_padding_mask is not None:
        validate.key_padding_mask(key_padding_mask, q.shape[0], k.shape[1], q.device)
    args = (q, k, v, key_padding_mask, validate.scale(scale, head_dim))
    if _needs_grad(q, k, v):
        return library.call("cross_attention_with_lse", *args,
                            _deterministic(deterministic))[0]
    return _run("cross_attention", args)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``T`` new queries ``[B, T, Hq, D]`` against a preallocated cache ``[B, Lmax, Hkv, D]``.

    ``cache_seqlens`` (int ``[B]``) counts each row's valid cache entries, the ``T``
    new ones included; query ``t`` sees keys ``j <= cache_seqlens[b] - T + t``, and
    with ``key_padding_mask`` (bool ``[B, Lmax]``) only the keys marked True.
    Inference only (no autograd).
    """
    # The decode hot path (once per layer and token): each line here costs ~0.1-1 us.
    head_dim = validate.qkv(q, k_cache, v_cache, k_name="k_cache", v_name="v_cache",
                            same_len=False)
    device = q.device
    validate.cache_seqlens(cache_seqlens, q.shape[0], device)
    if key_padding_mask is not None:
        validate.key_padding_mask(key_padding_mask, q.shape[0], k_cache.shape[1], device)
    if _needs_grad(q, k_cache, v_cache):
        raise RuntimeError("decode_attention is inference-only (no gradient); run it under "
                           "torch.no_grad() or use self_attention for training")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else validate.scale(scale, head_dim)
    if torch.compiler.is_compiling():
        return library.call("decode_attention", q, k_cache, v_cache, cache_seqlens,
                            key_padding_mask, scale)
    return dispatch.run("decode_attention", "cpu" if q.is_cpu else device.type, q, k_cache,
                        v_cache, cache_seqlens, key_padding_mask, scale)


def append_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    rope: bool | Rope = True,
    rope_theta: float = 10000.0,
    rope_scaling_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """Rotate new ``q`` ``[B, T, Hq, D]`` and ``k`` ``[B, T, Hkv, D]`` at positions
    ``cache_seqlens[b] + t``, write ``k`` and ``v`` into the caches ``[B, Lmax, Hkv, D]``
    in place, return the rotated ``q`` (a new tensor). The caller advances
    ``cache_seqlens`` by ``T``. ``rope`` as in :func:`self_attention`; the NTK length
    is ``max(cache_seqlens) + T`` unless the ``Rope`` fixes it."""
    head_dim = validate.qkv(q, k, v, same_len=True)
    batch, n_kv, dtype, device = q.shape[0], k.shape[2], q.dtype, q.device
    k_len = validate.cache("k_cache", k_cache, batch, n_kv, head_dim, dtype, device, written=True)
    v_len = validate.cache("v_cache", v_cache, batch, n_kv, head_dim, dtype, device, written=True)
    if k_len != v_len:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} "
                         "must have the same shape")
    if k_cache is v_cache:
        raise ValueError("k_cache and v_cache must be different tensors")
    validate.cache_seqlens(cache_seqlens, batch, device)
    spec = as_rope(rope, rope_theta, rope_scaling_factor, max_position_embeddings)
    validate.rope(spec, head_dim)
    return _run("append_kv_cache", (q, k, v, k_cache, v_cache, cache_seqlens, spec))
