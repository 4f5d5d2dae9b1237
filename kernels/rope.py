"""RoPE as one elementwise pass: rotate ``x`` ``[B, L, H, D]`` (rotate-half) with
cos/sin tables, forward or inverse (the transpose), possibly in place.

It serves ``ops.apply_rope`` on the Triton backend and takes RoPE out of the
attention kernels' inner loops: the attention launchers rotate the tensors that
those loops stream (K in the forward, Q and K in the backward) once, here.

One program rotates ``BLOCK_L`` tokens of one batch row, every head: the cos/sin
rows are loaded once and reused for all heads. Tables: ``[rows, D/2]`` (fp32, or
fp16 for 16-bit inputs; see ``attention_setup.rope_tables``), row of token
``(b, l)`` = ``b * table_stride_b + l``. Computed in fp32, rounded to ``OUT``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # BLOCK_L x HALF_P per head step
ELEMENTS_PER_THREAD = 16  # x1, x2, cos, sin in fp32 at this many per thread: no spills


@triton.jit
def _rope_kernel(
    X, OUT, COS, SIN,
    stride_xb, stride_xl, stride_xh,
    stride_ob, stride_ol, stride_oh,
    seq_len, n_heads, table_stride_b,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_L: tl.constexpr, INVERSE: tl.constexpr,
):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, HALF_P)
    ok = (offs_l < seq_len)[:, None] & (cols < HALF)[None, :]
    t = (b * table_stride_b + offs_l)[:, None] * HALF + cols[None, :]
    c = tl.load(COS + t, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(SIN + t, mask=ok, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    x_rows = X + b * stride_xb + offs_l[:, None] * stride_xl + cols[None, :]
    o_rows = OUT + b * stride_ob + offs_l[:, None] * stride_ol + cols[None, :]
    for h in range(n_heads):
        x1 = tl.load(x_rows + h * stride_xh, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + h * stride_xh + HALF, mask=ok, other=0.0).to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        tl.store(o_rows + h * stride_oh, y1.to(OUT.dtype.element_ty), mask=ok)
        tl.store(o_rows + h * stride_oh + HALF, y2.to(OUT.dtype.element_ty), mask=ok)


def rotate(x, cos, sin, table_stride_b: int, *, inverse: bool = False, out=None):
    """Rotate ``x`` ``[B, L, H, D]`` (unit stride on D) into ``out`` (a new contiguous
    tensor by default; ``x`` itself for in place). Returns ``out``."""
    batch, seq_len, n_heads, head_dim = x.shape
    if x.stride(3) != 1:
        raise ValueError(f"rotate needs a unit stride on head_dim, got strides {x.stride()}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.stride(3) != 1:
        raise ValueError(f"out must have x's shape {tuple(x.shape)} and a unit stride on "
                         f"head_dim, got {tuple(out.shape)} with strides {out.stride()}")
    if x.numel() == 0:
        return out
    half = head_dim // 2
    half_p = triton.next_power_of_2(half)
    block_l = min(64, max(1, TILE_ELEMENTS // half_p), triton.next_power_of_2(seq_len))
    _rope_kernel[(triton.cdiv(seq_len, block_l), batch)](
        x, out, cos, sin, x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2), seq_len, n_heads, table_stride_b,
        HALF=half, HALF_P=half_p, BLOCK_L=block_l, INVERSE=bool(inverse),
        num_warps=max(1, min(8, block_l * half_p // (32 * ELEMENTS_PER_THREAD))),
    )
    return out
