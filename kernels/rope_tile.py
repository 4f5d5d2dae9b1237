"""Tile helpers shared by the attention kernels: masked 2-D loads/stores, the
split-halves layout of q/k tiles and RoPE applied to a tile in registers.

RoPE (rotate-half) pairs element ``i`` with ``i + D/2``, so a head is handled as two
halves ``x1 = x[:, :D/2]``, ``x2 = x[:, D/2:]``, each padded to ``HALF_P`` (a power of
two, as ``tl.arange`` needs)::

    y1 = x1 * cos - x2 * sin        y2 = x2 * cos + x1 * sin

The rotation is orthogonal, so gradients go back through the inverse rotation
(the same formula with ``-sin``). ``cos``/``sin`` come from tables
``[rows, D/2]`` of float64 angles (see ``fastencdec.ops.triton_attention``), rounded to
fp32 (fp16 for 16-bit inputs) and converted to fp32 here. Computing the angle in-kernel
as fp32 ``pos * inv_freq`` would be off by ~``pos * 2^-24`` radians.

Split-halves layout: q/k tiles are held as ``[R, 2 * HALF_P]`` with ``x1`` in columns
``[0, HALF_P)`` and ``x2`` in ``[HALF_P, 2 * HALF_P)`` (zero padded). For a power-of-two
head_dim this is the plain layout; for 80 or 96 it pads each half instead of the
tail, at the same width as ``HEAD_P``. A ``q.k`` dot over it is one full-width dot,
and the halves of a gradient accumulated in it come back out with ``tl.split`` for
the inverse rotation in the store epilogue.
"""

import triton
import triton.language as tl


@triton.jit
def load_2d(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a tile; masks only where a check is asked for (unmasked loads vectorise)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_2d(ptrs, x, rows_ok, cols_ok, CHECK_COLS: tl.constexpr):
    """Store a tile whose rows may run past the tensor (always row-checked)."""
    if CHECK_COLS:
        tl.store(ptrs, x, mask=rows_ok[:, None] & cols_ok[None, :])
    else:
        tl.store(ptrs, x, mask=rows_ok[:, None])


@triton.jit
def load_rope_halves(
    x_ptr, rows, stride_row, rows_ok,
    cos_ptr, sin_ptr, table_rows,
    HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr, CHECK_ROWS: tl.constexpr,
):
    """Load rows ``rows`` of one head as halves ``(x1, x2)`` ``[R, HALF_P]`` in x's dtype,
    rotated by RoPE when ``ROPE`` (computed in fp32, rounded back like a separate
    RoPE pass would). ``table_rows``: the cos/sin table row of each tile row."""
    cols = tl.arange(0, HALF_P)
    cols_ok = cols < HALF
    ptrs = x_ptr + rows[:, None] * stride_row + cols[None, :]
    x1 = load_2d(ptrs, rows_ok, cols_ok, CHECK_ROWS, HALF != HALF_P)
    x2 = load_2d(ptrs + HALF, rows_ok, cols_ok, CHECK_ROWS, HALF != HALF_P)
    if ROPE:
        t_ptrs = table_rows[:, None] * HALF + cols[None, :]
        c = load_2d(cos_ptr + t_ptrs, rows_ok, cols_ok, CHECK_ROWS, HALF != HALF_P).to(tl.float32)
        s = load_2d(sin_ptr + t_ptrs, rows_ok, cols_ok, CHECK_ROWS, HALF != HALF_P).to(tl.float32)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        x1 = (a * c - b * s).to(x_ptr.dtype.element_ty)
        x2 = (b * c + a * s).to(x_ptr.dtype.element_ty)
    return x1, x2


@triton.jit
def store_unrotated_halves(
    g_ptr, g1, g2, rows, stride_row, rows_ok,
    cos_ptr, sin_ptr, table_rows,
    HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr,
):
    """Store fp32 gradient halves w.r.t. the rotated tensor as the gradient w.r.t.
    the input before RoPE (inverse rotation), in g's dtype."""
    cols = tl.arange(0, HALF_P)
    cols_ok = cols < HALF
    if ROPE:
        t_ptrs = table_rows[:, None] * HALF + cols[None, :]
        c = load_2d(cos_ptr + t_ptrs, rows_ok, cols_ok, True, HALF != HALF_P).to(tl.float32)
        s = load_2d(sin_ptr + t_ptrs, rows_ok, cols_ok, True, HALF != HALF_P).to(tl.float32)
        r1 = g1 * c + g2 * s
        r2 = g2 * c - g1 * s
    else:
        r1 = g1
        r2 = g2
    ptrs = g_ptr + rows[:, None] * stride_row + cols[None, :]
    out_ty = g_ptr.dtype.element_ty
    store_2d(ptrs, r1.to(out_ty), rows_ok, cols_ok, HALF != HALF_P)
    store_2d(ptrs + HALF, r2.to(out_ty), rows_ok, cols_ok, HALF != HALF_P)


@triton.jit
def split_columns(HALF: tl.constexpr, HALF_P: tl.constexpr):
    """Memory column of each split-halves tile column, and which of them are real."""
    c = tl.arange(0, 2 * HALF_P)
    if HALF == HALF_P:
        cols = c
        ok = c < 2 * HALF
    else:
        cols = (c // HALF_P) * HALF + c % HALF_P
        ok = (c % HALF_P) < HALF
    return cols, ok


@triton.jit
def load_split(x_ptr, rows, stride_row, rows_ok, HALF: tl.constexpr, HALF_P: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Rows ``rows`` of one head in the split-halves layout ``[R, 2 * HALF_P]``."""
    cols, cols_ok = split_columns(HALF, HALF_P)
    return load_2d(x_ptr + rows[:, None] * stride_row + cols[None, :], rows_ok, cols_ok,
                   CHECK_ROWS, HALF != HALF_P)


@triton.jit
def join_halves(x1, x2):
    """``[R, HALF_P]`` halves -> one ``[R, 2 * HALF_P]`` split-halves tile."""
    return tl.reshape(tl.permute(tl.join(x1, x2), (0, 2, 1)), (x1.shape[0], 2 * x1.shape[1]))


@triton.jit
def load_rope_split(
    x_ptr, rows, stride_row, rows_ok, cos_ptr, sin_ptr, table_rows,
    HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr, CHECK_ROWS: tl.constexpr,
):
    """Like ``load_split``, rotated by RoPE when ``ROPE`` (once per program: the tiles a
    kernel reads in its inner loop come pre-rotated)."""
    if ROPE:
        x1, x2 = load_rope_halves(x_ptr, rows, stride_row, rows_ok, cos_ptr, sin_ptr,
                                  table_rows, HALF, HALF_P, True, CHECK_ROWS)
        x = join_halves(x1, x2)
    else:
        x = load_split(x_ptr, rows, stride_row, rows_ok, HALF, HALF_P, CHECK_ROWS)
    return x


@triton.jit
def store_unrotated_split(
    g_ptr, g, rows, stride_row, rows_ok, cos_ptr, sin_ptr, table_rows,
    HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr,
):
    """Store an fp32 gradient tile held in the split-halves layout (w.r.t. the rotated
    tensor) as the gradient w.r.t. the input before RoPE."""
    g1, g2 = tl.split(tl.permute(tl.reshape(g, (g.shape[0], 2, HALF_P)), (0, 2, 1)))
    store_unrotated_halves(g_ptr, g1, g2, rows, stride_row, rows_ok, cos_ptr, sin_ptr,
                           table_rows, HALF, HALF_P, ROPE)
