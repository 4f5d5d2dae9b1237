"""Flash-attention forward with RoPE, grouped-query attention, causal or bidirectional
masking and a key padding mask.

RoPE stays out of the inner loop: the launcher rotates K once (``rope.rotate``, one
elementwise pass) and the kernel rotates its query tile once, when it loads it.
The main loop is then the same as without RoPE: one full-width ``q.k`` dot per key
tile (q/k tiles in the split-halves layout of ``rope_tile``).

One program computes ``BLOCK_M`` query rows of one (batch, query head): it walks
the key tiles with an online softmax in fp32 (base 2: ``log2(e)`` is folded into
``qk_scale``), so no ``[Lq, Lk]`` matrix ever exists. The row maximum is taken on
the raw scores and the scale applied in one FMA (``s * qk_scale - m``); that needs
``qk_scale > 0``, which the backend guarantees (a scale <= 0 is folded into q).
Query head ``h`` reads K/V head ``h // GROUP`` straight from memory: repeated K/V
are never materialised.

Key tiles are visited in two phases: tiles that need no mask (wholly inside the
key range and, when causal, wholly below the diagonal), then the few that do
(the diagonal, the tail past the last real key). With a padding mask the key
range ``[kv_lo, kv_hi)`` of each batch row (first/last real key) bounds the walk,
so a right- or left-padded batch skips its padding tiles.

A query with no visible key gets output 0 and log-sum-exp ``+inf`` (so that the
backward's ``exp2(s - lse)`` is 0): never NaN. The log-sum-exp is saved in base 2
and in units of ``qk_scale``: ``lse2 = log2(sum_j 2^(qk_scale * q.k_j))``.

Layout: q/k/v/o ``[B, L, H, D]``, any strides as long as D has unit stride.
"""

import torch
import triton
import triton.language as tl

from ..constants import LOG2E
from . import rope
from .attention_setup import launch, seq_bucket, side_inputs, static_args, strides3
from .rope_tile import load_2d, load_rope_split, load_split, store_2d


@triton.jit
def mask_tile(x, fill, offs_m, offs_n, n_ok, pad_ptr,
              CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, MASKED: tl.constexpr):
    """Set ``x[i, j]`` ``[BLOCK_M, BLOCK_N]`` to ``fill`` where query i cannot see key j.

    The padding mask applies to every tile; bounds (``n_ok``) and causality only in
    the masked phase, where a tile may straddle them."""
    if HAS_PAD:
        pad = tl.load(pad_ptr + offs_n, mask=n_ok, other=0)
        x = tl.where(pad[None, :] != 0, x, fill)
    if MASKED:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_m[:, None] >= offs_n[None, :])
        x = tl.where(ok, x, fill)
    return x


@triton.jit
def heaviest_first(LAST_IS_HEAVIEST: tl.constexpr):
    """``(tile, head, batch)`` of this program for a causal grid ``(tiles, heads, batch)``,
    ordered so that the whole grid starts with its longest tiles (the last query tiles;
    for dK/dV the first key tiles): the tile index varies slowest over the launch order,
    so short tiles fill the gaps at the end instead of long ones running alone."""
    n_tiles = tl.num_programs(0)
    n_heads = tl.num_programs(1)
    lin = tl.program_id(0) + n_tiles * (tl.program_id(1) + n_heads * tl.program_id(2))
    per_tile = n_heads * tl.num_programs(2)
    tile = lin // per_tile
    rest = lin % per_tile
    if LAST_IS_HEAVIEST:
        tile = n_tiles - 1 - tile
    return tile, rest % n_heads, rest // n_heads


@triton.jit
def key_tile_phases(start_m, kv_lo, kv_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr):
    """Key tiles for the query rows ``[start_m, start_m + BLOCK_M)``: those starting in
    ``[lo, full_end)`` need no bounds/causal mask, those in ``[full_end, masked_end)`` do."""
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    if CAUSAL:
        free_end = tl.minimum(start_m, kv_hi)  # keys below every row of the tile
        masked_end = tl.minimum(start_m + BLOCK_M, kv_hi)
    else:
        free_end = kv_hi
        masked_end = kv_hi
    full_end = lo + (tl.maximum(free_end - lo, 0) // BLOCK_N) * BLOCK_N
    return lo, full_end, masked_end


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, offs_m,
    k_base, v_base, stride_kl, stride_vl, pad_ptr,
    lo, hi, kv_hi, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update over the key tiles starting in ``[lo, hi)`` (K pre-rotated)."""
    offs_d = tl.arange(0, HEAD_P)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_hi
        k = load_split(k_base, offs_n, stride_kl, n_ok, HALF, HALF_P, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # raw scores
        s = mask_tile(s, float("-inf"), offs_m, offs_n, n_ok, pad_ptr, CAUSAL, HAS_PAD, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0
        # A row that has seen only masked keys keeps m = -inf: subtract 0 instead
        # so that exp2(-inf - -inf) never makes a NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_ref[:, None])  # one FMA per score
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_2d(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], n_ok, d_ok,
                    MASKED, HEAD_DIM != HEAD_P)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, LSE, COS, SIN, PAD, KV_RANGE,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_pad_b, table_stride_b,
    n_q_heads, len_q, len_k, qk_scale,
    seq_bucket,  # only an autotuning key
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, ROPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (query tiles, heads, batch): neighbouring programs share K/V in L2.
    if CAUSAL:
        pid_m, h, b = heaviest_first(True)  # longest rows first: better load balance
    else:
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
    pid_bh = b * n_q_heads + h
    kvh = h // GROUP
    b64 = b.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < len_q
    offs_d = tl.arange(0, HEAD_P)
    d_ok = offs_d < HEAD_DIM

    table_row0 = b * table_stride_b  # cos/sin table row of token (b, 0)
    pad_ptr = PAD + b64 * stride_pad_b
    if HAS_PAD:
        kv_lo = tl.load(KV_RANGE + 2 * b)
        kv_hi = tl.load(KV_RANGE + 2 * b + 1)
    else:
        kv_lo = 0
        kv_hi = len_k

    q = load_rope_split(Q + b64 * stride_qb + h * stride_qh, offs_m, stride_ql, m_ok,
                        COS, SIN, table_row0 + offs_m, HALF, HALF_P, ROPE, True)
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_P], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    lo, full_end, masked_end = key_tile_phases(start_m, kv_lo, kv_hi, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kl, stride_vl, pad_ptr,
        lo, full_end, kv_hi, qk_scale,
        HEAD_DIM, HEAD_P, HALF, HALF_P, BLOCK_N, CAUSAL, HAS_PAD, False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kl, stride_vl, pad_ptr,
        full_end, masked_end, kv_hi, qk_scale,
        HEAD_DIM, HEAD_P, HALF, HALF_P, BLOCK_N, CAUSAL, HAS_PAD, True, DOT_PRECISION)

    empty = l_i == 0.0  # no visible key: output 0, lse +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    store_2d(o_ptrs, out.to(Out.dtype.element_ty), m_ok, d_ok, HEAD_DIM != HEAD_P)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + pid_bh.to(tl.int64) * len_q + offs_m, lse, mask=m_ok)


def attention_fwd(q, k, v, problem):
    """Launch the forward: ``(out [B, Lq, Hq, D], lse [B, Hq, Lq] float32)``. ``q``/``k``/``v``
    need a unit stride on head_dim; ``problem`` from ``attention_setup.make_problem``
    with ``scale > 0``. With RoPE, K is rotated here once (a temporary copy)."""
    if problem.scale <= 0:
        raise ValueError(f"attention_fwd needs scale > 0, got {problem.scale}")
    batch, len_q, n_heads, head_dim = q.shape
    if problem.cos is not None:
        k = rope.rotate(k, problem.cos, problem.sin, problem.table_stride_b)
    len_k = k.shape[1]
    out = torch.empty((batch, len_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, len_q), dtype=torch.float32, device=q.device)
    cos, sin, pad, key_range, stride_pad_b = side_inputs(q, problem)
    args = (
        q, k, v, out, lse, cos, sin, pad, key_range,
        *strides3(q), *strides3(k), *strides3(v), *strides3(out),
        stride_pad_b, problem.table_stride_b,
        n_heads, len_q, len_k, problem.scale * LOG2E, seq_bucket(len_q, len_k),
    )
    launch(_attention_fwd_kernel, "fwd", args, static_args(q, k, problem),
           lambda bm, bn: (triton.cdiv(len_q, bm), n_heads, batch))
    return out, lse
