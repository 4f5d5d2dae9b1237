"""One decode step's cache update, fused: RoPE on the new q/k, k/v written into the cache.

One program per (batch row, new token) handles every head. Position ``pos =
SEQLENS[b] + t`` is both the RoPE position and the cache row; rows outside the
cache are never written (a bad length cannot write out of bounds).

Angles: ``pos * inv_freq`` reaches 1e4 radians at long contexts, where an fp32
product is off by ~1e-3. The product is taken in fp64 on ``inv_freq / 2pi`` (a
table of D/2 fp64 values built on the host), reduced to a fraction of a turn,
then cos/sin run in fp32 on an angle in [0, 2pi).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# fp32 nearest to 2pi; only scales a fraction. A tl.constexpr instance: the compiler (not
# the interpreter) rejects plain or annotated module globals inside a kernel.
TWO_PI_F32 = tl.constexpr(6.2831854820251465)


@triton.jit
def _rotate_and_store(
    X, OUT, x_off, out_off, stride_xh, stride_xd, stride_oh, stride_od, n_heads,
    cos, sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, ROPE: tl.constexpr,
):
    """Rotate-half RoPE on ``[n_heads, 2*HALF]`` rows: ``[x1, x2] -> [x1 c - x2 s, x2 c + x1 s]``.
    ``n_heads = 0`` skips the rows (used for a cache row outside the cache)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_f = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < n_heads)[:, None] & (offs_f < HALF)[None, :]
    x_ptrs = X + x_off + offs_h[:, None] * stride_xh + offs_f[None, :] * stride_xd
    o_ptrs = OUT + out_off + offs_h[:, None] * stride_oh + offs_f[None, :] * stride_od
    x1 = tl.load(x_ptrs, mask=mask, other=0.0)
    x2 = tl.load(x_ptrs + HALF * stride_xd, mask=mask, other=0.0)
    if ROPE:
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        y1 = x1f * cos[None, :] - x2f * sin[None, :]
        y2 = x2f * cos[None, :] + x1f * sin[None, :]
    else:
        y1 = x1
        y2 = x2
    tl.store(o_ptrs, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF * stride_od, y2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _append_kv_cache_kernel(
    Q, K, V, K_CACHE, V_CACHE, Q_OUT, SEQLENS, TURNS_PER_POS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcl, stride_kch, stride_kcd,
    stride_vcb, stride_vcl, stride_vch, stride_vcd,
    stride_ob, stride_ot, stride_oh, stride_od,
    t_new, n_q_heads, n_kv_heads, cache_len,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr, ROPE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // t_new).to(tl.int64)
    t = pid % t_new
    pos = tl.maximum(tl.load(SEQLENS + b).to(tl.int64), 0) + t
    kv_rows = tl.where(pos < cache_len, n_kv_heads, 0)  # never write past the cache

    offs_f = tl.arange(0, BLOCK_HALF)
    if ROPE:
        turns = pos.to(tl.float64) * tl.load(TURNS_PER_POS + offs_f, mask=offs_f < HALF, other=0.0)
        frac = turns - turns.to(tl.int64).to(tl.float64)  # turns >= 0: truncation = floor
        angle = frac.to(tl.float32) * TWO_PI_F32
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    else:
        cos = tl.zeros([BLOCK_HALF], tl.float32)
        sin = cos

    _rotate_and_store(Q, Q_OUT, b * stride_qb + t * stride_qt, b * stride_ob + t * stride_ot,
                      stride_qh, stride_qd, stride_oh, stride_od, n_q_heads, cos, sin,
                      HALF, BLOCK_HQ, BLOCK_HALF, ROPE)
    _rotate_and_store(K, K_CACHE, b * stride_kb + t * stride_kt, b * stride_kcb + pos * stride_kcl,
                      stride_kh, stride_kd, stride_kch, stride_kcd, kv_rows, cos, sin,
                      HALF, BLOCK_HKV, BLOCK_HALF, ROPE)
    _rotate_and_store(V, V_CACHE, b * stride_vb + t * stride_vt, b * stride_vcb + pos * stride_vcl,
                      stride_vh, stride_vd, stride_vch, stride_vcd, kv_rows, cos, sin,
                      HALF, BLOCK_HKV, BLOCK_HALF, False)


def append_kv_cache(q, k, v, k_cache, v_cache, seqlens, turns_per_pos=None):
    """Launch the fused update; returns the rotated ``q`` (a new tensor; a copy of ``q``
    without RoPE). ``turns_per_pos``: fp64 ``[D/2]`` = inv_freq / 2pi, or None."""
    batch, t_new, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    rope = turns_per_pos is not None
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    half = head_dim // 2
    _append_kv_cache_kernel[(batch * t_new,)](
        q, k, v, k_cache, v_cache, q_out, seqlens, turns_per_pos if rope else seqlens,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        *q_out.stride(),
        t_new, n_q, n_kv, k_cache.shape[1],
        HALF=half, BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HKV=triton.next_power_of_2(n_kv),
        BLOCK_HALF=max(16, triton.next_power_of_2(half)), ROPE=rope,
        num_warps=4,
    )
    return q_out
