"""Flash-attention backward for ``attention_fwd``: gradients w.r.t. the inputs
*before* RoPE, recomputed from the saved log-sum-exp (nothing ``O(L^2)`` is stored).

RoPE stays out of the inner loops: the launcher rotates Q and K once
(``rope.rotate``); the kernels see rotated tiles, do one full-width dot per tile,
and turn dQ/dK back through the inverse rotation in their store epilogue.

Three kernels, deterministic by default (no atomics):
- ``_attention_bwd_preprocess_kernel``: ``delta_i = sum_d dO[i, d] * O[i, d]``;
- ``_attention_bwd_dkdv_kernel``: one program per (key tile, K/V head, batch); it
  loops over the query heads of its group and their query tiles, so the group's
  contributions are summed in registers. Works on transposed tiles ``[keys, queries]``.
  When those programs cannot fill the GPU (``group_splits``), the group is split over
  several programs, each writing fp32 partial dK/dV that the launcher sums (in a
  fixed order: still deterministic);
- ``_attention_bwd_dq_kernel``: one program per (query tile, query head, batch),
  looping over key tiles in the forward's two phases.

``deterministic=False`` (FlashAttention-2 style): the dK/dV kernel also adds each
key tile's share of dQ (``dS^T K``) into an fp32 buffer with atomics, and the dQ
kernel (which recomputes ``Q K^T`` and ``P`` a second time: ~1.4x the matmul work)
is not launched; the buffer is scaled and turned back through the inverse rotation
by the RoPE pass. The summation order of dQ then varies from run to run.

With ``P = softmax(s)``, ``s = scale * q.k``: ``dV = P^T dO``, ``dS = P * (dO V^T - delta)``,
``dQ = scale * dS K``, ``dK = scale * dS^T Q``. Gradients of the rotated q/k go back
through the inverse rotation. Padded keys get zero dK/dV; a query with no visible
key has ``lse = +inf`` so its probabilities, and its gradients, are 0.
"""

import torch
import triton
import triton.language as tl

from ..constants import LOG2E
from . import rope
from .attention_fwd import heaviest_first, key_tile_phases, mask_tile
from .attention_setup import launch, seq_bucket, side_inputs, static_args, strides3
from .rope_tile import load_2d, load_split, split_columns, store_2d, store_unrotated_split


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO, DELTA,
    stride_ob, stride_ol, stride_oh,
    stride_dob, stride_dol, stride_doh,
    n_q_heads, len_q,
    HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * n_q_heads + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_P)
    m_ok = offs_m < len_q
    d_ok = offs_d < HEAD_DIM
    o = load_2d(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                m_ok, d_ok, True, HEAD_DIM != HEAD_P)
    do = load_2d(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol
                 + offs_d[None, :], m_ok, d_ok, True, HEAD_DIM != HEAD_P)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * len_q + offs_m, delta, mask=m_ok)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, offs_n, key_real,
    q_base, do_base, lse_base, delta_base, dq_base, stride_ql, stride_dol, stride_dql,
    lo, len_q, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK/dV of one key tile over the (rotated) query tiles from ``lo`` on.

    One loop, every tile masked: splitting off the unmasked tiles (as the forward
    does) multiplies the pipelined loops inside the head loop and made ptxas spill."""
    offs_d = tl.arange(0, HEAD_P)
    d_ok = offs_d < HEAD_DIM
    cols, cols_ok = split_columns(HALF, HALF_P)
    for start_m in range(lo, len_q, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < len_q
        q = load_split(q_base, offs_m, stride_ql, m_ok, HALF, HALF_P, True)
        do = load_2d(do_base + offs_m[:, None] * stride_dol + offs_d[None, :], m_ok, d_ok,
                     True, HEAD_DIM != HEAD_P)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        ok = m_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_m[None, :] >= offs_n[:, None])
        if ATOMIC_DQ and HAS_PAD:  # padded keys' dK/dV are zeroed later; their dQ share here
            ok = ok & key_real[:, None]
        p_t = tl.where(ok, tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)  # [BLOCK_N, BLOCK_M]
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:  # this key tile's share of dQ (split-halves layout), fp32 atomics
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dql + cols[None, :], dq,
                          mask=m_ok[:, None] & cols_ok[None, :])
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, COS, SIN, PAD, KV_RANGE,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkl, stride_dkh,
    stride_dvb, stride_dvl, stride_dvh,
    stride_dqb, stride_dql, stride_dqh,
    stride_dk_split, stride_dv_split,
    stride_pad_b, table_stride_b,
    n_q_heads, len_q, len_k, qk_scale, sm_scale, heads_per_split,
    seq_bucket,  # only an autotuning key
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, ROPE: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # also add dQ into DQ_ACC (fp32) with atomics
    GROUP_SPLIT: tl.constexpr,  # grid axis 1 = K/V heads x splits; DK/DV: fp32 partials
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if CAUSAL:  # grid (key tiles, K/V heads, batch); the first key tiles see the most queries
        pid_n, kvh, b = heaviest_first(False)
    else:
        pid_n = tl.program_id(0)
        kvh = tl.program_id(1)
        b = tl.program_id(2)
    if GROUP_SPLIT:  # this program: heads [g0, g0 + heads_per_split) of the group
        n_splits = GROUP // heads_per_split
        split = kvh % n_splits
        kvh = kvh // n_splits
        g0 = split * heads_per_split
        n_heads_here = heads_per_split
    else:
        split = 0
        g0 = 0
        n_heads_here = GROUP
    b64 = b.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < len_k
    offs_d = tl.arange(0, HEAD_P)
    d_ok = offs_d < HEAD_DIM
    table_row0 = b * table_stride_b

    k = load_split(K + b64 * stride_kb + kvh * stride_kh, offs_n, stride_kl, n_ok, HALF, HALF_P,
                   True)
    v = load_2d(V + b64 * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vl
                + offs_d[None, :], n_ok, d_ok, True, HEAD_DIM != HEAD_P)

    key_real = n_ok
    if HAS_PAD:
        kv_lo = tl.load(KV_RANGE + 2 * b)
        kv_hi = tl.load(KV_RANGE + 2 * b + 1)
        live = (start_n < kv_hi) & (start_n + BLOCK_N > kv_lo)
        n_heads_here = tl.where(live, n_heads_here, 0)  # a tile of padding only: no work
        key_real = tl.load(PAD + b64 * stride_pad_b + offs_n, mask=n_ok, other=0) != 0

    dk = tl.zeros([BLOCK_N, 2 * HALF_P], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_P], dtype=tl.float32)
    if CAUSAL:
        q_lo = (start_n // BLOCK_M) * BLOCK_M  # earlier queries cannot see these keys
    else:
        q_lo = 0
    for g in range(0, n_heads_here):
        h = kvh * GROUP + g0 + g
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        dq_base = DQ_ACC + b64 * stride_dqb + h * stride_dqh
        row0 = (b64 * n_q_heads + h) * len_q
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, offs_n, key_real, q_base, do_base, LSE + row0, DELTA + row0,
            dq_base, stride_ql, stride_dol, stride_dql, q_lo, len_q, qk_scale, sm_scale,
            HEAD_DIM, HEAD_P, HALF, HALF_P, BLOCK_M, CAUSAL, HAS_PAD, ATOMIC_DQ,
            DOT_PRECISION)

    dk = dk * sm_scale
    if HAS_PAD:  # padded keys are never seen: their gradients are exactly 0
        dk = tl.where(key_real[:, None], dk, 0.0)
        dv = tl.where(key_real[:, None], dv, 0.0)
    store_unrotated_split(DK + split * stride_dk_split + b64 * stride_dkb + kvh * stride_dkh,
                          dk, offs_n, stride_dkl, n_ok, COS, SIN, table_row0 + offs_n, HALF,
                          HALF_P, ROPE and not GROUP_SPLIT)  # partials: the launcher rotates
    dv_ptrs = DV + split * stride_dv_split + b64 * stride_dvb + kvh * stride_dvh \
        + offs_n[:, None] * stride_dvl + offs_d[None, :]
    store_2d(dv_ptrs, dv.to(DV.dtype.element_ty), n_ok, d_ok, HEAD_DIM != HEAD_P)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, offs_m,
    k_base, v_base, stride_kl, stride_vl, pad_ptr,
    lo, hi, kv_hi, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query tile over the (rotated) key tiles starting in ``[lo, hi)``."""
    offs_d = tl.arange(0, HEAD_P)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_hi
        k = load_split(k_base, offs_n, stride_kl, n_ok, HALF, HALF_P, MASKED)
        v = load_2d(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], n_ok, d_ok,
                    MASKED, HEAD_DIM != HEAD_P)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = mask_tile(p, 0.0, offs_m, offs_n, n_ok, pad_ptr, CAUSAL, HAS_PAD, MASKED)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, COS, SIN, PAD, KV_RANGE,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    stride_pad_b, table_stride_b,
    n_q_heads, len_q, len_k, qk_scale, sm_scale,
    seq_bucket,  # only an autotuning key
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, ROPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if CAUSAL:  # grid (query tiles, heads, batch); the last query tiles see the most keys
        pid_m, h, b = heaviest_first(True)
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
    table_row0 = b * table_stride_b
    pad_ptr = PAD + b64 * stride_pad_b
    if HAS_PAD:
        kv_lo = tl.load(KV_RANGE + 2 * b)
        kv_hi = tl.load(KV_RANGE + 2 * b + 1)
    else:
        kv_lo = 0
        kv_hi = len_k

    q = load_split(Q + b64 * stride_qb + h * stride_qh, offs_m, stride_ql, m_ok, HALF, HALF_P,
                   True)
    do = load_2d(DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol
                 + offs_d[None, :], m_ok, d_ok, True, HEAD_DIM != HEAD_P)
    row0 = pid_bh.to(tl.int64) * len_q
    lse = tl.load(LSE + row0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row0 + offs_m, mask=m_ok, other=0.0)
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh

    dq = tl.zeros([BLOCK_M, 2 * HALF_P], dtype=tl.float32)
    lo, full_end, masked_end = key_tile_phases(start_m, kv_lo, kv_hi, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(
        dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kl, stride_vl,
        pad_ptr, lo, full_end, kv_hi, qk_scale,
        HEAD_DIM, HEAD_P, HALF, HALF_P, BLOCK_N, CAUSAL, HAS_PAD, False, DOT_PRECISION)
    dq = _dq_tiles(
        dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kl, stride_vl,
        pad_ptr, full_end, masked_end, kv_hi, qk_scale,
        HEAD_DIM, HEAD_P, HALF, HALF_P, BLOCK_N, CAUSAL, HAS_PAD, True, DOT_PRECISION)

    store_unrotated_split(DQ + b64 * stride_dqb + h * stride_dqh, dq * sm_scale, offs_m,
                          stride_dql, m_ok, COS, SIN, table_row0 + offs_m, HALF, HALF_P, ROPE)


PREPROCESS_BLOCK_M = 64
NOMINAL_BLOCK_N = 64  # key tile size the group-split heuristic assumes (tiles are tuned)


def group_splits(batch: int, n_kv_heads: int, len_k: int, group: int, sm_count: int,
                 forced: int | None = None) -> int:
    """Programs the GQA group of the dK/dV kernel is split over: 1 while ``batch x K/V
    heads x key tiles`` (tiles of ``NOMINAL_BLOCK_N`` keys) reach ``2 x sm_count``,
    else the smallest divisor of ``group`` that does (or ``group``). ``forced``: a
    split count (clamped to a divisor of ``group``). Shapes only: graph-safe."""
    divisors = [d for d in range(1, group + 1) if group % d == 0]
    if forced is not None:
        return max(d for d in divisors if d <= max(1, forced))
    programs = batch * n_kv_heads * triton.cdiv(len_k, NOMINAL_BLOCK_N)
    for d in divisors:
        if programs * d >= 2 * sm_count:
            return d
    return group


def attention_bwd(grad_out, q, k, v, out, lse, problem, *, need_dq: bool, need_dkv: bool,
                  deterministic: bool = True, sm_count: int = 132,
                  split_count: int | None = None):
    """Launch the backward: ``(dq, dk, dv)`` w.r.t. the inputs before RoPE (None for the
    ones not needed). Every tensor needs a unit stride on head_dim; ``problem.scale > 0``.
    With RoPE, Q and K are rotated here once (temporary copies). ``deterministic=False``
    accumulates dQ with fp32 atomics in the dK/dV kernel (see the module doc).
    ``sm_count`` / ``split_count``: for ``group_splits``."""
    if problem.scale <= 0:
        raise ValueError(f"attention_bwd needs scale > 0, got {problem.scale}")
    batch, len_q, n_heads, head_dim = q.shape
    if problem.cos is not None:
        q = rope.rotate(q, problem.cos, problem.sin, problem.table_stride_b)
        k = rope.rotate(k, problem.cos, problem.sin, problem.table_stride_b)
    len_k, n_kv_heads = k.shape[1], k.shape[2]
    static = static_args(q, k, problem)
    cos, sin, pad, key_range, stride_pad_b = side_inputs(q, problem)
    qk_scale = problem.scale * LOG2E
    bucket = seq_bucket(len_q, len_k)

    delta = torch.empty((batch, n_heads, len_q), dtype=torch.float32, device=q.device)
    _attention_bwd_preprocess_kernel[(triton.cdiv(len_q, PREPROCESS_BLOCK_M), n_heads, batch)](
        out, grad_out, delta, *strides3(out), *strides3(grad_out), n_heads, len_q,
        HEAD_DIM=head_dim, HEAD_P=static["HEAD_P"], BLOCK_M=PREPROCESS_BLOCK_M,
    )

    dq = dk = dv = None
    atomic = need_dq and not deterministic
    if need_dkv or atomic:
        group = n_heads // n_kv_heads
        splits = group_splits(batch, n_kv_heads, len_k, group, sm_count, forced=split_count)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dk_out, dv_out = dk, dv
        if splits > 1:  # fp32 partial sums, one slice per split of the group
            dk_out = torch.empty((splits, *k.shape), dtype=torch.float32, device=k.device)
            dv_out = torch.empty((splits, *v.shape), dtype=torch.float32, device=v.device)
        dq_acc = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic
                  else delta)  # never touched without atomics
        dq_strides = strides3(dq_acc) if atomic else (0, 0, 0)
        args = (
            q, k, v, grad_out, lse, delta, dk_out, dv_out, dq_acc, cos, sin, pad, key_range,
            *strides3(q), *strides3(k), *strides3(v), *strides3(grad_out),
            *strides3(dk_out[0] if splits > 1 else dk), *strides3(dv_out[0] if splits > 1 else dv),
            *dq_strides, dk_out.stride(0) if splits > 1 else 0,
            dv_out.stride(0) if splits > 1 else 0, stride_pad_b, problem.table_stride_b,
            n_heads, len_q, len_k, qk_scale, problem.scale, group // splits, bucket,
        )
        launch(_attention_bwd_dkdv_kernel, "dkdv", args,
               {**static, "ATOMIC_DQ": atomic, "GROUP_SPLIT": splits > 1},
               lambda bm, bn: (triton.cdiv(len_k, bn), n_kv_heads * splits, batch),
               reset_to_zero=["DQ_ACC"] if atomic else None)
        if splits > 1:  # sum the partials in a fixed order, then the epilogue's rotation
            dk_sum = dk_out.sum(0)
            if problem.cos is not None:
                rope.rotate(dk_sum, problem.cos, problem.sin, problem.table_stride_b,
                            inverse=True, out=dk)
            else:
                dk.copy_(dk_sum)
            dv.copy_(dv_out.sum(0))
        if atomic:  # the accumulator holds dQ of the rotated q, already scaled
            dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            if problem.cos is not None:
                rope.rotate(dq_acc, problem.cos, problem.sin, problem.table_stride_b,
                            inverse=True, out=dq)
            else:
                dq.copy_(dq_acc)
        if not need_dkv:
            dk = dv = None
    if need_dq and not atomic:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        args = (
            q, k, v, grad_out, lse, delta, dq, cos, sin, pad, key_range,
            *strides3(q), *strides3(k), *strides3(v), *strides3(grad_out),
            *strides3(dq), stride_pad_b, problem.table_stride_b,
            n_heads, len_q, len_k, qk_scale, problem.scale, bucket,
        )
        launch(_attention_bwd_dq_kernel, "dq", args, static,
               lambda bm, bn: (triton.cdiv(len_q, bm), n_heads, batch))
    return dq, dk, dv
