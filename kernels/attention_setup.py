"""Host-side setup shared by the attention launchers (``attention_fwd``/``attention_bwd``)
and the RoPE pass (``rope``): the problem description the kernels read, RoPE cos/sin
tables, and tile choice (fixed small tiles under the CPU interpreter, autotuned
configs on a GPU, chosen per problem variant).

RoPE cos/sin come from tables of the reference's float64 angles, built on the host
(fp32 for fp32 inputs, fp16 for 16-bit ones), one row per token: ``[L, D/2]`` for a
start offset (cached), ``[B*L, D/2]`` for a positions tensor. The NTK base comes from
``Rope.base`` at ``L = max(positions) + 1`` like the reference (a host read only for
a positions tensor with dynamic scaling and no fixed length).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

from ..spec import Rope, rope_inv_freq

__all__ = ["AttentionProblem", "make_problem", "rope_tables", "table_dtype", "launch",
           "interpreting", "gpu_configs", "size_class", "strides3", "static_args",
           "side_inputs", "seq_bucket"]

# (BLOCK_M = queries, BLOCK_N = keys) per kernel under the CPU interpreter: small
# tiles keep tests fast while still spanning several tiles at modest lengths.
# Tests may patch this.
INTERPRETER_BLOCKS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}
MAX_GRID_YZ = 65535  # grids are (tiles, heads, batch); CUDA caps the y and z sizes


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class AttentionProblem:
    """Everything but q/k/v that the kernels need (none of it takes gradients)."""

    causal: bool
    scale: float
    pad: torch.Tensor | None  # uint8 [B, Lk], 1 = real key
    key_range: torch.Tensor | None  # int32 [B, 2]: first real key, one past the last
    cos: torch.Tensor | None  # [rows, D/2], fp32 or fp16
    sin: torch.Tensor | None
    table_stride_b: int  # table row of token (b, l) is b * table_stride_b + l


def make_problem(q, key_padding_mask, scale: float, *, causal: bool, positions=None,
                 offset: int = 0, rope: Rope | None = None) -> AttentionProblem:
    pad = key_range = None
    if key_padding_mask is not None:
        pad = key_padding_mask.contiguous().view(torch.uint8)
        key_range = _key_range(key_padding_mask)
    cos = sin = None
    stride_b = 0
    if rope is not None:
        cos, sin, stride_b = rope_tables(positions, offset, q.shape[0], q.shape[1], q.shape[3],
                                         q.device, table_dtype(q.dtype), rope)
    return AttentionProblem(bool(causal), float(scale), pad, key_range, cos, sin, stride_b)


def _key_range(mask: torch.Tensor) -> torch.Tensor:
    """Per batch row ``[first real key, last real key + 1)``; ``(0, 0)`` with none.
    Bounds the kernels' walk over key tiles (no host sync)."""
    len_k = mask.shape[1]
    idx = torch.arange(len_k, device=mask.device, dtype=torch.int32)
    hi = torch.where(mask, idx + 1, 0).amax(dim=1)
    lo = torch.minimum(torch.where(mask, idx, len_k).amin(dim=1), hi)
    return torch.stack([lo, hi], dim=1).to(torch.int32).contiguous()


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 tables for fp32 inputs; fp16 ones (error <= 2^-12, below the rounding of
    the rotated 16-bit values) halve the tables' share of bandwidth and shared memory."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def rope_tables(positions, offset, batch, seq_len, head_dim, device, dtype, rope: Rope):
    """``(cos, sin, table_stride_b)``: tables ``[rows, D/2]`` of float64 angles, one row
    per token, in ``dtype``."""
    if positions is not None:
        seen = int(positions.max()) + 1 if rope.needs_positions_max() else 0  # host read
        base = rope.base(head_dim, seen)
        cos, sin = _cos_sin(positions.reshape(-1).to(device), head_dim, base, dtype)
        return cos, sin, seq_len
    base = rope.base(head_dim, offset + seq_len)
    cos, sin = _offset_tables(device, offset, seq_len, head_dim, base, dtype)
    return cos, sin, 0


def _cos_sin(pos: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    angles = pos.to(torch.float64)[:, None] * rope_inv_freq(head_dim, base, device=pos.device)
    return angles.cos().to(dtype).contiguous(), angles.sin().to(dtype).contiguous()


@lru_cache(maxsize=16)
def _offset_tables(device, start, seq_len, head_dim, base, dtype):
    pos = torch.arange(start, start + seq_len, dtype=torch.int64, device=device)
    return _cos_sin(pos, head_dim, base, dtype)


def strides3(t):
    """(batch, seq, head) strides of a [B, L, H, D] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def static_args(q, k, problem: AttentionProblem) -> dict:
    """Compile-time parameters shared by every attention kernel."""
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


def side_inputs(q, problem: AttentionProblem):
    """Pointer arguments that may be absent (any tensor stands in; never read)."""
    return (
        problem.cos if problem.cos is not None else q,
        problem.sin if problem.sin is not None else q,
        problem.pad if problem.pad is not None else q,
        problem.key_range if problem.key_range is not None else q,
        problem.pad.stride(0) if problem.pad is not None else 0,
    )


def seq_bucket(len_q: int, len_k: int) -> int:
    """Autotuning key: lengths rounded up to powers of two (tuning per exact length
    would re-tune for every new batch shape)."""
    return triton.next_power_of_2(len_q) * 1_000_000 + triton.next_power_of_2(len_k)


def launch(kernel, kind: str, args, static: dict, grid_for, reset_to_zero=None) -> None:
    """Fixed small tiles under the interpreter; autotuned configs on a GPU.
    ``reset_to_zero``: argument names the kernel accumulates into (zeroed between the
    autotuner's trial runs)."""
    if interpreting():
        block_m, block_n = INTERPRETER_BLOCKS[kind]
        kernel[grid_for(block_m, block_n)](*args, **static, BLOCK_M=block_m, BLOCK_N=block_n)
        return
    tuned = _tuned(kernel, kind, static["HEAD_DIM"], fp32=static["DOT_PRECISION"] == "ieee",
                   causal=static["CAUSAL"], has_pad=static["HAS_PAD"],
                   atomic_dq=static.get("ATOMIC_DQ", False),
                   reset_to_zero=tuple(reset_to_zero or ()))
    tuned[lambda meta: grid_for(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **static)


def size_class(head_dim: int) -> str:
    return "small" if head_dim <= 64 else ("medium" if head_dim <= 128 else "large")


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel and head-dim class
# (BLOCK_M = queries, BLOCK_N = keys), picked from sm_90 compiles (ptxas register and
# spill reports, Triton's shared-memory size; ``bench/compile_sm90.py --full`` checks
# every one of them for every variant and head_dim): none spills for bf16/fp16, none
# needs more than 227 KiB. (Dropped by that check: dK/dV 64x64 and 32x64/4 warps at
# D=80-128, 64x32 at D=256, forward 128x32 and 64x64 at D=256: 4-88 B of spills in
# some variant; dK/dV with 128-key tiles when it also accumulates dQ, see below.)
# Not yet timed on a GPU.
GPU_CONFIGS = {
    ("fwd", "small"): [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3),
                       (128, 32, 4, 3)],
    ("fwd", "medium"): [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 32, 8, 3),
                        (64, 64, 4, 3), (64, 32, 4, 3)],
    ("fwd", "large"): [(64, 32, 8, 3), (64, 32, 8, 2), (64, 16, 4, 2)],
    ("dkdv", "small"): [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3),
                        (16, 64, 4, 3)],
    ("dkdv", "medium"): [(32, 64, 8, 2), (32, 128, 8, 2), (16, 128, 8, 2)],
    ("dkdv", "large"): [(32, 32, 8, 2), (16, 32, 8, 2)],
    ("dq", "small"): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", "medium"): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3),
                       (64, 32, 4, 3)],
    ("dq", "large"): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
}
# The Hopper-standard 128x128 forward tile: it fits 227 KiB at D <= 128 now that RoPE
# is out of the loop, but the padding mask's per-tile loads push it past 255
# registers (spills), and so does a bidirectional D=128 tile: only where it does not.
WIDE_FWD = (128, 128, 8, 3)


def _wide_fwd_fits(head_dim: int, causal: bool, has_pad: bool) -> bool:
    return not has_pad and (head_dim <= 64 or (head_dim == 128 and causal))


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
# Set FASTENCDEC_AUTOTUNE_ONE=1 to keep only the first config of each list (GPU test
# runs: one compile per shape instead of a tuning sweep).
ONE_CONFIG_ENV_VAR = "FASTENCDEC_AUTOTUNE_ONE"


def gpu_configs(kind: str, head_dim: int, *, fp32: bool, causal: bool, has_pad: bool,
                atomic_dq: bool = False) -> list[tuple[int, int, int, int]]:
    """The autotune candidates of one kernel for one problem variant."""
    table = FP32_GPU_CONFIGS if fp32 else GPU_CONFIGS
    configs = list(table[(kind, size_class(head_dim))])
    if kind == "fwd" and not fp32 and _wide_fwd_fits(head_dim, causal, has_pad):
        configs.insert(0, WIDE_FWD)
    if kind == "dkdv" and atomic_dq and has_pad and head_dim > 64:
        # the atomics' dQ tile plus the padding mask: a 32x128 tile spills (36-80 B)
        configs = [c for c in configs if c[0] * c[1] < 32 * 128]
    if os.environ.get(ONE_CONFIG_ENV_VAR) == "1":
        configs = configs[:1]
    return configs


_TUNED: dict[tuple, object] = {}


def _tuned(kernel, kind: str, head_dim: int, *, fp32: bool, causal: bool, has_pad: bool,
           atomic_dq: bool = False, reset_to_zero: tuple = ()):
    """The autotuned wrapper of ``kernel`` for one problem variant. Tuning results are
    kept in Triton's cache directory (``cache_results``) where this Triton has it, so a
    new process does not re-tune."""
    configs = gpu_configs(kind, head_dim, fp32=fp32, causal=causal, has_pad=has_pad,
                          atomic_dq=atomic_dq)
    key = (kind, tuple(configs), reset_to_zero)
    if key not in _TUNED:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in configs]
        keys = TUNING_KEYS + (["ATOMIC_DQ", "GROUP_SPLIT"] if kind == "dkdv" else [])
        options = dict(configs=configs, key=keys, reset_to_zero=list(reset_to_zero) or None)
        try:
            tuner = triton.autotune(**options, cache_results=True)
        except TypeError:  # a Triton without persistent tuning results
            tuner = triton.autotune(**options)
        _TUNED[key] = tuner(kernel)
    return _TUNED[key]
