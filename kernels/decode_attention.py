"""Decode-time attention: a few new queries against a long K/V block (flash-decoding).

One program owns one (batch row, K/V head, key split, query tile). Its query tile
holds every query head of the GQA group for every new token (row ``m`` is token
``m // GROUP``, head ``m % GROUP`` of the group), so each K/V tile is read once per
group. With one split the program writes the normalised output; with several it
writes a partial (``lse`` in log2 units, normalised ``o``) and
``_decode_attention_merge_kernel`` combines the splits.

Two modes share the split kernel:
- cache mode (``CAUSAL_CACHE``): ``SEQLENS[b]`` valid rows; query ``t`` sees keys
  ``j <= len - T + t`` (bottom-right aligned);
- cross mode: every key.
Either mode can filter keys with a key padding mask (nonzero = real). A query that
sees no key returns 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..constants import LOG2E

MAX_SPLITS = 128
NO_SPLIT_MAX_BLOCKS = 4  # this few key tiles: the merge would cost more than it saves
WAVE_EFFICIENCY_SHARE = 0.85
MERGE_SPLIT_BLOCK = 16


@triton.jit
def _decode_attention_split_kernel(
    Q, K, V, SEQLENS, MASK, OUT, PART_O, PART_LSE,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_mb, stride_ml,
    stride_ob, stride_ot, stride_oh, stride_od,
    n_q_heads, n_kv_heads, t_new, key_len, keys_per_split, n_splits, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL_CACHE: tl.constexpr, HAS_MASK: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kv_head = pid_bh % n_kv_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < GROUP * t_new
    tok = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM

    q_ptrs = (Q + b * stride_qb + tok[:, None] * stride_qt + head[:, None] * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    if CAUSAL_CACHE:
        # Clamp so a bad length can never read outside the cache.
        kv_len = tl.load(SEQLENS + b).to(tl.int32)
        kv_len = tl.minimum(tl.maximum(kv_len, 0), key_len)
        last_key = kv_len - t_new + tok  # inclusive; < 0 means the query sees nothing
    else:
        kv_len = key_len
    lo64 = split.to(tl.int64) * keys_per_split
    lo = lo64.to(tl.int32)
    hi = tl.minimum(lo + keys_per_split, kv_len)  # splits past the row's end do no work

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    # Tile pointers advance in int64; offsets inside a tile stay int32 (no overflow on
    # huge caches).
    offs_tile = tl.arange(0, BLOCK_N)
    k_tile = k_base + lo64 * stride_kl
    v_tile = v_base + lo64 * stride_vl
    m_tile = MASK + b * stride_mb + lo64 * stride_ml
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_tile
        n_valid = offs_n < hi
        k = tl.load(k_tile + offs_tile[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                    mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [D, N]
        # "ieee" keeps fp32 inputs exact (no TF32); fp16/bf16 use tensor cores regardless.
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        visible = n_valid[None, :] & m_valid[:, None]
        if CAUSAL_CACHE:
            visible = visible & (offs_n[None, :] <= last_key[:, None])
        if HAS_MASK:
            real = tl.load(m_tile + offs_tile * stride_ml, mask=n_valid, other=0)
            visible = visible & (real != 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf: subtract 0 to avoid -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_tile + offs_tile[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
        k_tile += BLOCK_N * stride_kl
        v_tile += BLOCK_N * stride_vl
        if HAS_MASK:
            m_tile += BLOCK_N * stride_ml

    # l == 0 only when nothing was visible (acc is 0 too); NaN in l stays NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        o_ptrs = (OUT + b * stride_ob + tok[:, None] * stride_ot + head[:, None] * stride_oh
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    else:
        row = ((b * n_q_heads + head) * t_new + tok) * n_splits + split
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(PART_LSE + row, lse, mask=m_valid)
        tl.store(PART_O + row[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=m_valid[:, None] & d_valid[None, :])


@triton.jit
def _decode_attention_merge_kernel(
    PART_O, PART_LSE, OUT,
    stride_ob, stride_ot, stride_oh, stride_od,
    n_q_heads, t_new, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * T + t
    tok = row % t_new
    head = (row // t_new) % n_q_heads
    b = row // (t_new * n_q_heads)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM

    offs_s = tl.arange(0, BLOCK_S)
    lse_all = tl.load(PART_LSE + row * n_splits + offs_s, mask=offs_s < n_splits,
                      other=float("-inf"))
    m = tl.max(lse_all, 0)
    # Every split empty: weights exp2(-inf - 0) = 0 and the row is 0, never NaN.
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    total = tl.zeros([SPLIT_BLOCK], tl.float32)
    acc = tl.zeros([SPLIT_BLOCK, BLOCK_D], tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        offs = s0 + tl.arange(0, SPLIT_BLOCK)
        s_valid = offs < n_splits
        lse = tl.load(PART_LSE + row * n_splits + offs, mask=s_valid, other=float("-inf"))
        w = tl.exp2(lse - m_safe)
        o = tl.load(PART_O + (row * n_splits + offs)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_valid[:, None] & d_valid[None, :], other=0.0)
        total += w
        acc += w[:, None] * o
    denom = tl.sum(total, 0)
    out = tl.sum(acc, 0) / tl.where(denom == 0.0, 1.0, denom)
    o_ptrs = OUT + b * stride_ob + tok * stride_ot + head * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=d_valid)


def tile_config(head_dim: int, group: int, t_new: int) -> dict:
    """Tile sizes for one launch. ``BLOCK_M`` >= 16 because ``tl.dot`` needs it on
    older Triton/GPUs; the query tile is capped at 64 rows (bigger groups get
    several tiles, each reading K/V once)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(64, max(16, triton.next_power_of_2(group * t_new)))
    block_n = 64 if block_d <= 128 else 32
    num_warps = 8 if block_d > 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
                num_stages=2 if block_d > 128 else 3)


def choose_num_splits(programs: int, key_len: int, block_n: int, sm_count: int) -> int:
    """FlashAttention's split heuristic. No split when ``programs`` (batch x K/V heads x
    query tiles) already fill 80% of the SMs, or when the keys span at most
    ``NO_SPLIT_MAX_BLOCKS`` tiles; otherwise the smallest split count whose wave
    efficiency (``waves / ceil(waves)``) is within 85% of the best one, among counts
    that change the tiles per split. Depends on shapes only (graph-safe)."""
    n_blocks = triton.cdiv(key_len, block_n)
    if programs >= 0.8 * sm_count or n_blocks <= NO_SPLIT_MAX_BLOCKS:
        return 1
    max_splits = min(MAX_SPLITS, sm_count, n_blocks)

    def eligible(n: int) -> bool:  # n splits that leave the tiles per split unchanged waste work
        return n == 1 or triton.cdiv(n_blocks, n) != triton.cdiv(n_blocks, n - 1)

    def efficiency(n: int) -> float:
        waves = programs * n / sm_count
        return waves / math.ceil(waves)

    best = max(efficiency(n) for n in range(1, max_splits + 1) if eligible(n))
    for n in range(1, max_splits + 1):
        if eligible(n) and efficiency(n) >= WAVE_EFFICIENCY_SHARE * best:
            return n
    return 1


def decode_attention(q, k, v, *, seqlens=None, key_mask=None, scale=None, num_splits=None,
                     sm_count=132):
    """Launch the decode kernels. ``q`` ``[B, T, Hq, D]``; ``k``/``v`` ``[B, Lk, Hkv, D]``.

    ``seqlens`` (int ``[B]``) selects cache mode (bottom-right causal over each row's
    valid length); ``key_mask`` (bool/uint8 ``[B, Lk]``, nonzero = real) filters keys,
    in either mode. ``num_splits`` None = heuristic. Returns a new ``[B, T, Hq, D]``
    tensor of ``q``'s dtype. Allocations depend on shapes only.
    """
    batch, t_new, n_q, head_dim = q.shape
    key_len, n_kv = k.shape[1], k.shape[2]
    group = n_q // n_kv
    cfg = tile_config(head_dim, group, t_new)
    m_tiles = triton.cdiv(group * t_new, cfg["BLOCK_M"])
    if num_splits is None:
        num_splits = choose_num_splits(batch * n_kv * m_tiles, key_len, cfg["BLOCK_N"], sm_count)
    num_splits = max(1, min(int(num_splits), key_len, MAX_SPLITS))
    keys_per_split = triton.cdiv(triton.cdiv(key_len, num_splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    num_splits = triton.cdiv(key_len, keys_per_split)
    single = num_splits == 1

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if single:
        part_o = part_lse = out  # unused
    else:
        rows = batch * n_q * t_new
        part_o = torch.empty(rows, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(rows, num_splits, device=q.device, dtype=torch.float32)
    if key_mask is not None and key_mask.dtype == torch.bool:
        key_mask = key_mask.view(torch.uint8)  # same bytes; pointer loads as integers
    mask_arg = key_mask if key_mask is not None else q
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    seqlens_arg = seqlens if seqlens is not None else q
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    grid = (batch * n_kv, num_splits, m_tiles)
    _decode_attention_split_kernel[grid](
        q, k, v, seqlens_arg, mask_arg, out, part_o, part_lse,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        n_q, n_kv, t_new, key_len, keys_per_split, num_splits, scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        CAUSAL_CACHE=seqlens is not None, HAS_MASK=key_mask is not None, SINGLE_SPLIT=single,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not single:
        _decode_attention_merge_kernel[(batch * n_q * t_new,)](
            part_o, part_lse, out, *out.stride(), n_q, t_new, num_splits,
            HEAD_DIM=head_dim, BLOCK_S=max(16, triton.next_power_of_2(num_splits)),
            SPLIT_BLOCK=MERGE_SPLIT_BLOCK, BLOCK_D=cfg["BLOCK_D"], num_warps=4,
        )
    return out
