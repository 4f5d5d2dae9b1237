"""Decode-time Triton entry points: ``decode_attention``, ``append_kv_cache``,
``cross_attention_decode`` (forward only).

Inputs reach ``decode_attention``/``append_kv_cache`` already validated by
``fastencdec.ops.attention``; each entry point's ``unsupported`` hook sends inputs
the kernels do not take to the reference (see ``dispatch.call``).

CUDA graphs: a decode step (``append_kv_cache`` then ``decode_attention``) makes no
host sync and allocates only shape-dependent buffers, with one exception: dynamic
NTK RoPE scaling (``rope_scaling_factor > 1``) with a cache longer than
``max_position_embeddings`` needs ``max(cache_seqlens)`` on the host, as the
reference does. The RoPE frequency table is built on the first call for a given
(device, head_dim, base): run one step eagerly before capturing.

``FASTENCDEC_DECODE_SPLITS=n`` (or ``num_splits=n``) forces the number of key
splits; tests use it to cover both the single-split and the merge path.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch

from ..reference.rope import rope_base, rope_inv_freq
from . import validate

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPLITS_ENV_VAR = "FASTENCDEC_DECODE_SPLITS"
_INTERPRETER_SM_COUNT = 8  # nominal, so the heuristic still splits small CPU cases


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None, num_splits=None):
    """``q`` ``[B, T, Hq, D]`` against the cache ``[B, Lmax, Hkv, D]``; query ``t``
    sees keys ``j < len`` with ``j <= len - T + t`` (``len = cache_seqlens[b]``)."""
    from fastencdec.kernels.decode_attention import decode_attention_fwd

    return decode_attention_fwd(
        q, k_cache, v_cache, seqlens=cache_seqlens.contiguous(), scale=scale,
        num_splits=_splits(num_splits), sm_count=_sm_count(q.device),
    )


def cross_attention_decode(q, k, v, key_padding_mask=None, scale=None, *, num_splits=None):
    """Forward-only cross-attention for few queries (``Lq <= 16`` is the target):
    ``q`` ``[B, Lq, Hq, D]`` against static encoder ``k``/``v`` ``[B, Lk, Hkv, D]``,
    optional bool ``key_padding_mask`` ``[B, Lk]`` (True = real). Rows whose keys are
    all masked return 0. Raises ``ValueError`` for inputs the kernel does not take
    (check ``cross_attention_decode.unsupported`` first to fall back instead)."""
    from fastencdec.kernels.decode_attention import decode_attention_fwd

    validate.qkv(q, k, v, same_len=False)
    validate.key_padding_mask(key_padding_mask, q.shape[0], k.shape[1], q.device)
    validate.scale(scale)
    reason = _unsupported_attention(q, k, v)
    if reason:
        raise ValueError(f"cross_attention_decode: {reason}")
    return decode_attention_fwd(
        q, k, v, key_mask=key_padding_mask, scale=scale,
        num_splits=_splits(num_splits), sm_count=_sm_count(q.device),
    )


def append_kv_cache(
    q, k, v, k_cache, v_cache, cache_seqlens, *,
    rope=True, rope_theta=10000.0, rope_scaling_factor=1.0, max_position_embeddings=None,
):
    """Rotate new ``q``/``k`` at positions ``cache_seqlens[b] + t``, write ``k``/``v``
    into the caches in place, return the rotated ``q`` (``q`` itself without RoPE)."""
    from fastencdec.kernels.kv_cache import append_kv_fwd

    turns = None
    if rope:
        base = _rope_base(cache_seqlens, q.shape[1], k_cache.shape[1], q.shape[3],
                          rope_theta, rope_scaling_factor, max_position_embeddings)
        turns = _turns_per_position(q.device, q.shape[3], base)
    return append_kv_fwd(q, k, v, k_cache, v_cache, cache_seqlens.contiguous(), turns)


def _rope_base(cache_seqlens, t_new, cache_len, head_dim, theta, factor, max_pos) -> float:
    """The reference's base: ``rope_base`` at ``L = max(cache_seqlens) + T``. Without
    scaling, or when the cache cannot outgrow ``max_pos``, ``L`` does not matter and
    no host sync happens (``L = 0`` gives bit-identical results)."""
    if factor <= 1.0 or cache_len <= max_pos:
        return rope_base(theta, head_dim, 0, factor, max_pos)
    if not validate.can_read_values(cache_seqlens):
        raise RuntimeError(
            "append_kv_cache: dynamic NTK RoPE scaling with a cache longer than "
            "max_position_embeddings reads max(cache_seqlens) on the host and cannot be "
            "captured in a CUDA graph"
        )
    seen_len = int(cache_seqlens.max()) + t_new  # host sync, as in the reference
    return rope_base(theta, head_dim, seen_len, factor, max_pos)


_TURNS_TABLES: dict[tuple, torch.Tensor] = {}


def _turns_per_position(device: torch.device, head_dim: int, base: float) -> torch.Tensor:
    """``inv_freq / 2pi`` (float64, the reference's inv_freq), cached per (device, D, base)."""
    key = (device, head_dim, base)
    table = _TURNS_TABLES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "append_kv_cache: the RoPE table for this (head_dim, base) is built on the "
                "first call; run one decode step before capturing a CUDA graph"
            )
        if len(_TURNS_TABLES) >= 64:  # dynamic NTK changes the base every step: stay bounded
            _TURNS_TABLES.pop(next(iter(_TURNS_TABLES)))
        table = (rope_inv_freq(head_dim, base) / (2.0 * math.pi)).to(device)
        _TURNS_TABLES[key] = table
    return table


def _splits(num_splits):
    if num_splits is not None:
        return int(num_splits)
    value = os.environ.get(SPLITS_ENV_VAR, "").strip()
    return int(value) if value else None


@cache
def _sm_count_cached(device_type: str, index: int) -> int:
    if device_type != "cuda":
        return _INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else 0)
    return _sm_count_cached(device.type, index)


def _unsupported_attention(q, k, v, *args, **kwargs) -> str | None:
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} has no Triton decode kernel (supported: {SUPPORTED_HEAD_DIMS})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"{q.dtype} has no Triton decode kernel"
    if q.device.type != "cuda" and q.dtype == torch.bfloat16:
        return "bf16 tl.dot is unreliable under the Triton CPU interpreter"
    return None


def _unsupported_append(q, k, v, *args, **kwargs) -> str | None:
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} has no Triton append_kv_cache kernel"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"{q.dtype} has no Triton append_kv_cache kernel"
    return None


decode_attention.unsupported = _unsupported_attention
cross_attention_decode.unsupported = _unsupported_attention
append_kv_cache.unsupported = _unsupported_append
