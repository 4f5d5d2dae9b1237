"""Triton ``self_attention`` / ``cross_attention``: fused RoPE + GQA flash attention
with autograd (kernels in ``fastencdec.kernels.attention_fwd`` / ``attention_bwd``).

Inputs arrive validated by ``fastencdec.ops.attention``. Supported: head_dim in
``SUPPORTED_HEAD_DIMS``, fp32/fp16/bf16 (fp32 dots in IEEE precision, not TF32),
any lengths, any strides with a unit stride on head_dim (others are copied).
Falls back to the reference (via the ``unsupported`` hook): other head dims,
bf16 under the Triton CPU interpreter (its ``tl.dot`` is unreliable for bf16), and
batch or head counts above the CUDA grid limit (65535).
float64 never reaches here (``ops.attention`` sends it to the reference).

RoPE cos/sin come from tables of the reference's float64 angles, built on the
host (fp32 for fp32 inputs, fp16 for 16-bit ones), one row per token: ``[L, D/2]``
for a start offset (cached), ``[B*L, D/2]`` for a positions tensor. Dynamic NTK
scaling uses ``rope_base`` at ``L = max(positions) + 1`` like the reference (a host
sync only for a positions tensor with scaling > 1).

``FASTENCDEC_POISON_OUTPUTS=1`` fills every buffer a kernel must write with NaN
before the launch, so that an element a kernel forgets shows up in tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

from ..reference.rope import rope_base, rope_inv_freq
from . import dispatch

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
POISON_ENV_VAR = "FASTENCDEC_POISON_OUTPUTS"
LOG2E = 1.4426950408889634
# Cross-attention with at most this many queries and no gradient goes to the
# split-K decode kernel (fastencdec.ops.triton_decode), when it is available.
DECODE_MAX_QUERIES = 16

# (BLOCK_M = queries, BLOCK_N = keys) per kernel under the CPU interpreter: small
# tiles keep tests fast while still spanning several tiles at modest lengths.
# Tests may patch this.
INTERPRETER_BLOCKS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}
PREPROCESS_BLOCK_M = 64
MAX_GRID_YZ = 65535  # grids are (tiles, heads, batch); CUDA caps the y and z sizes


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------- entry points


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
    """RoPE (on q and k, inside the kernel) + GQA self-attention, ``[B, L, H, D]``.
    Same semantics as ``fastencdec.reference.self_attention``.

    Falls back to the reference (``unsupported`` hook): head_dim outside
    ``SUPPORTED_HEAD_DIMS``, bf16 under the CPU interpreter, batch or heads above
    ``MAX_GRID_YZ``."""
    tables = None
    if rope:
        tables = _rope_tables(positions, q.shape[0], q.shape[1], q.shape[3], q.device,
                              _table_dtype(q.dtype), rope_theta, rope_scaling_factor,
                              max_position_embeddings)
    problem = _problem(q, key_padding_mask, scale, causal=bool(causal), rope_tables=tables)
    return _FlashAttention.apply(q, k, v, problem)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decoder queries ``[B, Lq, Hq, D]`` against static encoder K/V ``[B, Lk, Hkv, D]``:
    no RoPE, not causal. Same semantics as ``fastencdec.reference.cross_attention``.

    Inference with ``Lq <= DECODE_MAX_QUERIES`` uses the split-K decode kernel when it
    is available and takes the inputs. Falls back to the reference like
    ``self_attention``."""
    # ---- decode fast path: few queries, inference only -> colleague's split-K kernel.
    if q.shape[1] <= DECODE_MAX_QUERIES and not dispatch.needs_grad(q, k, v):
        decode = _decode_cross_attention()
        hook = getattr(decode, "unsupported", None)
        if decode is not None and not (hook and hook(q, k, v)):
            return decode(q, k, v, key_padding_mask, scale)
    # ---- end of the decode fast path.
    problem = _problem(q, key_padding_mask, scale, causal=False, rope_tables=None)
    return _FlashAttention.apply(q, k, v, problem)


def _unsupported(q, k, v, *args, **kwargs) -> str | None:
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return (f"head_dim {head_dim} has no Triton attention kernel "
                f"(supported: {SUPPORTED_HEAD_DIMS})")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{q.dtype} has no Triton attention kernel"
    if q.dtype == torch.bfloat16 and _interpreting():
        return "bf16 tl.dot is unreliable under the Triton CPU interpreter"
    if q.shape[0] > MAX_GRID_YZ or q.shape[2] > MAX_GRID_YZ:
        return f"batch or heads above {MAX_GRID_YZ} (CUDA grid limit)"
    return None


self_attention.unsupported = _unsupported
cross_attention.unsupported = _unsupported


@lru_cache(maxsize=1)
def _decode_cross_attention():
    """The split-K decode kernel's entry point, or None while it does not exist."""
    try:
        from .triton_decode import cross_attention_decode
    except ImportError:
        return None
    return cross_attention_decode


# --------------------------------------------------------------------------- problem setup


@dataclass(frozen=True)
class _Problem:
    """Everything but q/k/v that the kernels need (none of it takes gradients)."""

    causal: bool
    scale: float
    pad: torch.Tensor | None  # uint8 [B, Lk], 1 = real key
    key_range: torch.Tensor | None  # int32 [B, 2]: first real key, one past the last
    cos: torch.Tensor | None  # [rows, D/2], fp32 or fp16
    sin: torch.Tensor | None
    table_stride_b: int  # table row of token (b, l) is b * table_stride_b + l


def _problem(q, key_padding_mask, scale, *, causal, rope_tables) -> _Problem:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pad = key_range = None
    if key_padding_mask is not None:
        pad = key_padding_mask.contiguous().view(torch.uint8)
        key_range = _key_range(key_padding_mask)
    cos, sin, stride_b = rope_tables if rope_tables is not None else (None, None, 0)
    return _Problem(causal, scale, pad, key_range, cos, sin, stride_b)


def _key_range(mask: torch.Tensor) -> torch.Tensor:
    """Per batch row ``[first real key, last real key + 1)``; ``(0, 0)`` with none.
    Bounds the kernels' walk over key tiles (no host sync)."""
    len_k = mask.shape[1]
    idx = torch.arange(len_k, device=mask.device, dtype=torch.int32)
    hi = torch.where(mask, idx + 1, 0).amax(dim=1)
    lo = torch.minimum(torch.where(mask, idx, len_k).amin(dim=1), hi)
    return torch.stack([lo, hi], dim=1).to(torch.int32).contiguous()


def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 tables for fp32 inputs; fp16 ones (error <= 2^-12, below the rounding of
    the rotated 16-bit values) halve the tables' share of bandwidth and shared memory."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def _rope_tables(positions, batch, seq_len, head_dim, device, dtype, theta, factor, max_pos):
    """``(cos, sin, table_stride_b)``: tables ``[rows, D/2]`` of the reference's float64
    angles, one row per token, in ``dtype``."""
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:
        seen_len = int(positions.max()) + 1 if factor > 1.0 else 0  # NTK needs it (sync)
        base = rope_base(theta, head_dim, seen_len, factor, max_pos)
        cos, sin = _cos_sin(positions.reshape(-1).to(device), head_dim, base, dtype)
        return cos, sin, seq_len
    start = 0 if positions is None else int(positions)
    base = rope_base(theta, head_dim, start + seq_len, factor, max_pos)
    cos, sin = _offset_tables(device, start, seq_len, head_dim, base, dtype)
    return cos, sin, 0


def _cos_sin(pos: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    angles = pos.to(torch.float64)[:, None] * rope_inv_freq(head_dim, base, device=pos.device)
    return angles.cos().to(dtype).contiguous(), angles.sin().to(dtype).contiguous()


@lru_cache(maxsize=16)
def _offset_tables(device, start, seq_len, head_dim, base, dtype):
    pos = torch.arange(start, start + seq_len, dtype=torch.int64, device=device)
    return _cos_sin(pos, head_dim, base, dtype)


# --------------------------------------------------------------------------- autograd


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem: _Problem):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        out, lse = _forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem = problem
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        need_dq = ctx.needs_input_grad[0]
        need_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = _backward(_unit_last_stride(grad_out), q, k, v, out, lse, ctx.problem,
                               need_dq=need_dq, need_dkv=need_dkv)
        return dq, dk, dv, None


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """A buffer every element of which the kernel writes (NaN-poisoned on request)."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV_VAR) == "1":
        buf.fill_(float("nan"))
    return buf


def _strides3(t):
    """(batch, seq, head) strides of a [B, L, H, D] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _static_args(q, k, problem: _Problem) -> dict:
    """Compile-time parameters shared by every kernel."""
    head_dim = q.shape[3]
    half = head_dim // 2
    return dict(
        GROUP=q.shape[2] // k.shape[2],
        HEAD_DIM=head_dim,
        HEAD_P=triton.next_power_of_2(head_dim),
        HALF=half,
        HALF_P=triton.next_power_of_2(half),
        CAUSAL=problem.causal,
        HAS_PAD=problem.pad is not None,
        ROPE=problem.cos is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _side_inputs(q, problem: _Problem):
    """Pointer arguments that may be absent (any tensor stands in; never read)."""
    return (
        problem.cos if problem.cos is not None else q,
        problem.sin if problem.sin is not None else q,
        problem.pad if problem.pad is not None else q,
        problem.key_range if problem.key_range is not None else q,
        problem.pad.stride(0) if problem.pad is not None else 0,
    )


def _forward(q, k, v, problem: _Problem):
    from fastencdec.kernels.attention_fwd import attention_fwd_kernel

    batch, len_q, n_heads, head_dim = q.shape
    len_k = k.shape[1]
    out = _new_buffer((batch, len_q, n_heads, head_dim), q.dtype, q.device)
    lse = _new_buffer((batch, n_heads, len_q), torch.float32, q.device)
    cos, sin, pad, key_range, stride_pad_b = _side_inputs(q, problem)
    args = (
        q, k, v, out, lse, cos, sin, pad, key_range,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        stride_pad_b, problem.table_stride_b,
        n_heads, len_q, len_k, problem.scale * LOG2E, _bucket(len_q, len_k),
    )
    _launch(attention_fwd_kernel, "fwd", args, _static_args(q, k, problem),
            lambda bm, bn: (triton.cdiv(len_q, bm), n_heads, batch))
    return out, lse


def _backward(grad_out, q, k, v, out, lse, problem: _Problem, *, need_dq, need_dkv):
    from fastencdec.kernels.attention_bwd import (
        attention_bwd_dkdv_kernel,
        attention_bwd_dq_kernel,
        attention_bwd_preprocess_kernel,
    )

    batch, len_q, n_heads, head_dim = q.shape
    len_k, n_kv_heads = k.shape[1], k.shape[2]
    static = _static_args(q, k, problem)
    cos, sin, pad, key_range, stride_pad_b = _side_inputs(q, problem)
    qk_scale = problem.scale * LOG2E
    bucket = _bucket(len_q, len_k)

    delta = _new_buffer((batch, n_heads, len_q), torch.float32, q.device)
    attention_bwd_preprocess_kernel[(triton.cdiv(len_q, PREPROCESS_BLOCK_M), n_heads, batch)](
        out, grad_out, delta, *_strides3(out), *_strides3(grad_out), n_heads, len_q,
        HEAD_DIM=head_dim, HEAD_P=static["HEAD_P"], BLOCK_M=PREPROCESS_BLOCK_M,
    )

    dq = dk = dv = None
    if need_dkv:
        dk = _new_buffer(k.shape, k.dtype, k.device)
        dv = _new_buffer(v.shape, v.dtype, v.device)
        args = (
            q, k, v, grad_out, lse, delta, dk, dv, cos, sin, pad, key_range,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
            *_strides3(dk), *_strides3(dv), stride_pad_b, problem.table_stride_b,
            n_heads, len_q, len_k, qk_scale, problem.scale, bucket,
        )
        _launch(attention_bwd_dkdv_kernel, "dkdv", args, static,
                lambda bm, bn: (triton.cdiv(len_k, bn), n_kv_heads, batch))
    if need_dq:
        dq = _new_buffer(q.shape, q.dtype, q.device)
        args = (
            q, k, v, grad_out, lse, delta, dq, cos, sin, pad, key_range,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
            *_strides3(dq), stride_pad_b, problem.table_stride_b,
            n_heads, len_q, len_k, qk_scale, problem.scale, bucket,
        )
        _launch(attention_bwd_dq_kernel, "dq", args, static,
                lambda bm, bn: (triton.cdiv(len_q, bm), n_heads, batch))
    return dq, dk, dv


# --------------------------------------------------------------------------- launching


def _bucket(len_q: int, len_k: int) -> int:
    """Autotuning key: lengths rounded up to powers of two (tuning per exact length
    would re-tune for every new batch shape)."""
    return triton.next_power_of_2(len_q) * 1_000_000 + triton.next_power_of_2(len_k)


def _launch(kernel, kind: str, args, static: dict, grid_for) -> None:
    """Fixed small tiles under the interpreter; autotuned configs on a GPU."""
    if _interpreting():
        block_m, block_n = INTERPRETER_BLOCKS[kind]
        kernel[grid_for(block_m, block_n)](*args, **static, BLOCK_M=block_m, BLOCK_N=block_n)
        return
    tuned = _tuned(kernel, kind, _size_class(static["HEAD_DIM"]),
                   fp32=static["DOT_PRECISION"] == "ieee")
    tuned[lambda meta: grid_for(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **static)


def _size_class(head_dim: int) -> str:
    return "small" if head_dim <= 64 else ("medium" if head_dim <= 128 else "large")


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel and head-dim class
# (BLOCK_M = queries, BLOCK_N = keys). Picked from sm_90 compiles (ptxas register
# and shared-memory reports) of the worst case (RoPE + causal + padding): none
# spills for D <= 128; D=256 keeps small tiles. Larger query tiles amortise the
# in-loop K rotation of the forward. Not yet timed on a GPU.
GPU_CONFIGS = {
    ("fwd", "small"): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3)],
    ("fwd", "medium"): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                        (64, 32, 4, 3)],
    ("fwd", "large"): [(64, 32, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (64, 16, 4, 2)],
    ("dkdv", "small"): [(32, 128, 8, 2), (32, 64, 8, 3), (64, 64, 8, 2), (16, 64, 4, 3),
                        (32, 64, 4, 3)],
    ("dkdv", "medium"): [(32, 64, 8, 2), (32, 64, 8, 3), (16, 128, 8, 2)],
    ("dkdv", "large"): [(32, 32, 8, 2), (16, 32, 8, 2)],
    ("dq", "small"): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", "medium"): [(128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3),
                       (64, 32, 4, 3)],
    ("dq", "large"): [(16, 32, 4, 2), (64, 16, 8, 2), (32, 32, 8, 2)],
}
# fp32 runs IEEE dots on CUDA cores (exact, not fast): small tiles that fit.
FP32_GPU_CONFIGS = {
    ("fwd", "small"): [(32, 32, 4, 2), (64, 32, 8, 2)],
    ("fwd", "medium"): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("fwd", "large"): [(16, 32, 4, 1), (32, 16, 4, 2)],
    ("dkdv", "small"): [(32, 32, 4, 2), (16, 64, 4, 2)],
    ("dkdv", "medium"): [(16, 32, 4, 2), (32, 32, 4, 2)],
    ("dkdv", "large"): [(16, 16, 4, 2), (16, 32, 4, 1)],
    ("dq", "small"): [(32, 32, 4, 2), (64, 32, 4, 2)],
    ("dq", "medium"): [(32, 32, 4, 2)],
    ("dq", "large"): [(16, 32, 4, 1), (32, 16, 4, 2)],
}
TUNING_KEYS = ["seq_bucket", "GROUP", "HEAD_DIM", "CAUSAL", "HAS_PAD", "ROPE"]


_TUNED: dict[tuple[str, str, bool], object] = {}


def _tuned(kernel, kind: str, size_class: str, fp32: bool):
    """The autotuned wrapper of ``kernel`` for one head-dim class and dtype family."""
    key = (kind, size_class, fp32)
    if key not in _TUNED:
        table = FP32_GPU_CONFIGS if fp32 else GPU_CONFIGS
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in table[(kind, size_class)]
        ]
        _TUNED[key] = triton.autotune(configs=configs, key=TUNING_KEYS)(kernel)
    return _TUNED[key]
