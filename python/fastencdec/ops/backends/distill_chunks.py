"""The distillation loss with the LM head fused in (Liger-style chunking), for any
row kernel: the Triton kernel on GPUs, a torch one on the CPU.

The student logits never exist as one ``[N, V]`` tensor. The rows are cut into a
few large chunks; per chunk the forward pass runs ``logits = h_c @ W.T`` (the
device's GEMM, input dtype), the row kernel turns the chunk buffer into
``dloss/dlogits`` in place, and the two gradient GEMMs consume it right away
(``grad_h[c] = g @ W``, ``grad_W += g.T @ h_c``). The autograd formula of the op only
scales the stored gradients by ``grad_output``.

No value is read on the host (no ``nonzero``, no count of real rows), so a training
step can be captured in a CUDA graph: ignored rows (``labels == ignore_index``) go
through the chunks too; the row kernel gives them loss 0 and a zero gradient row
without reading their logits, their hidden states are zeroed before the weight
gradient (they may hold NaN), and the mean divides by a device-side count.

A row kernel has the signature of ``fastencdec.kernels.distill_loss.distill_rows``:
``rows_kernel(z, g, teacher, teacher_rows, labels, losses, *, shared, alpha,
temperature, reverse, ignore_index, grad_scale, write_grad)``.

Chunks are few and large (about ``budget`` bytes of logits each): every chunk re-reads
and re-writes the whole ``[V, d]`` weight gradient, which is what makes small chunks
slow for small N and d (mu-330m: d=1024, V=32128).
"""

from __future__ import annotations

import math

import torch

__all__ = ["choose_chunk_rows", "fused_loss", "from_logits", "GPU_CHUNK_BYTES",
           "CPU_CHUNK_BYTES"]

GPU_CHUNK_BYTES = 256 * 2**20  # logits (+ teacher logits) held per chunk
CPU_CHUNK_BYTES = 8 * 2**20  # the CPU row kernel keeps about ten fp32 temporaries per chunk
_ROW_ALIGN = 64  # chunk rows are a multiple of this (GEMM tiles), except a single chunk


def choose_chunk_rows(n_rows: int, bytes_per_row: int, budget: int = GPU_CHUNK_BYTES) -> int:
    """Rows per chunk: the fewest (equal) chunks whose buffers fit in ``budget`` bytes."""
    if n_rows <= 0:
        return 1
    n_chunks = max(1, math.ceil(n_rows * bytes_per_row / budget))
    rows = math.ceil(n_rows / n_chunks)
    if n_chunks > 1 and rows > _ROW_ALIGN:
        rows = math.ceil(rows / _ROW_ALIGN) * _ROW_ALIGN
    return max(1, min(rows, n_rows))


class _WeightGrad:
    """``Σ_c g_c.T @ h_c`` over chunks; fp32 accumulation for fp16/bf16 weights (one
    ``addmm`` with an fp32 output on CUDA; a product in the input dtype plus an fp32
    add where that is unavailable)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.acc = None  # [V, d]
        self.tmp = None  # per-chunk product in the input dtype (fallback only)

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        if self.acc is None:  # first chunk: written straight into the result
            self.acc = g.t() @ h
            return
        if self.acc.dtype == self.weight.dtype and self.weight.dtype in _HALF:
            self.acc = self.acc.float()  # a second chunk arrived: switch to fp32
        if self.acc.dtype == g.dtype:
            self.acc.addmm_(g.t(), h)
        elif not (g.is_cuda and _addmm_fp32_out(self.acc, g.t(), h)):
            if self.tmp is None:
                self.tmp = torch.empty(self.weight.shape, dtype=g.dtype, device=g.device)
            torch.mm(g.t(), h, out=self.tmp)
            self.acc.add_(self.tmp)

    def result(self) -> torch.Tensor:
        self.tmp = None
        if self.acc is None:
            return torch.zeros_like(self.weight)
        return self.acc.to(self.weight.dtype)


_HALF = (torch.float16, torch.bfloat16)
_addmm_fp32_ok = [True]


def _addmm_fp32_out(acc, a, b) -> bool:
    """``acc += a @ b`` in one GEMM with fp32 output from 16-bit inputs, where this
    torch supports it (CUDA, torch >= 2.8); False when it does not (once, then never
    tried again)."""
    if not _addmm_fp32_ok[0]:
        return False
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        _addmm_fp32_ok[0] = False
        return False
    return True


def fused_loss(rows_kernel, hidden, weight, teacher_for_chunk, shared, teacher_row_bytes,
               labels, *, alpha, temperature, reverse, ignore_index, chunk_size,
               want_grad_hidden, want_grad_weight, budget=GPU_CHUNK_BYTES):
    """``(loss, grad_hidden, grad_weight)``, the gradients already divided by the number
    of real rows (empty tensors when not wanted).

    ``teacher_for_chunk(rows)`` returns ``(teacher, teacher_rows)`` for the given
    original row indices: the kernel reads row ``teacher_rows[r]`` of ``teacher``.
    """
    device, vocab, n_rows = hidden.device, weight.shape[0], hidden.shape[0]
    labels = labels.contiguous()  # the kernel reads labels[r] at unit stride
    write_grad = want_grad_hidden or want_grad_weight
    real = labels != ignore_index
    inv_real = 1.0 / real.sum().clamp(min=1).to(torch.float32)  # device scalar: no host read

    loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
    loss = torch.zeros((), dtype=loss_dtype, device=device)
    grad_hidden = hidden.new_empty(0)
    if want_grad_hidden:  # contiguous, so that chunk slices are valid ``out=`` targets
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device)
    grad_weight = _WeightGrad(weight) if want_grad_weight else None
    if n_rows == 0:
        return loss, grad_hidden, (grad_weight.result() if grad_weight else weight.new_empty(0))

    bytes_per_row = vocab * hidden.element_size() + teacher_row_bytes
    rows_per_chunk = (min(int(chunk_size), n_rows) if chunk_size
                      else choose_chunk_rows(n_rows, bytes_per_row, budget))
    logits_buf = torch.empty(rows_per_chunk, vocab, dtype=hidden.dtype, device=device)
    losses = torch.empty(rows_per_chunk, dtype=loss_dtype, device=device)
    all_rows = torch.arange(n_rows, device=device)
    weight_t = weight.t()

    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        h_c = hidden[start:stop]
        logits = logits_buf[: stop - start]
        torch.mm(h_c, weight_t, out=logits)
        teacher, teacher_rows = teacher_for_chunk(all_rows[start:stop])
        rows_kernel(logits, logits, teacher, teacher_rows, labels[start:stop],
                    losses[: stop - start], shared=shared, alpha=alpha,
                    temperature=temperature, reverse=reverse, ignore_index=ignore_index,
                    grad_scale=inv_real, write_grad=write_grad)
        loss += losses[: stop - start].sum()
        if want_grad_hidden:  # ignored rows have zero gradient rows: their result is 0
            torch.mm(logits, weight, out=grad_hidden[start:stop])
        if want_grad_weight:  # 0 * NaN would leak an ignored row's NaN into grad_W
            grad_weight.add(logits, h_c.masked_fill(~real[start:stop, None], 0.0))
    return (loss * inv_real, grad_hidden,
            grad_weight.result() if want_grad_weight else weight.new_empty(0))


def teacher_logits_source(teacher_logits):
    """``teacher_for_chunk`` reading precomputed teacher logits in place."""
    def for_chunk(rows):
        return teacher_logits, rows
    return for_chunk


class TeacherHeadSource:
    """``teacher_for_chunk`` computing the teacher's logits per chunk (its LM head fused
    too, only the shared vocabulary prefix), into one reused buffer."""

    def __init__(self, teacher_hidden, teacher_head_weight, shared):
        self.hidden = teacher_hidden
        self.weight_t = teacher_head_weight[:shared].t()
        self.shared = shared
        self.logits = None
        self.rows = None

    def __call__(self, rows):
        n = rows.numel()
        if self.logits is None or self.logits.shape[0] < n:
            self.logits = torch.empty(n, self.shared, dtype=self.hidden.dtype,
                                      device=self.hidden.device)
            self.rows = torch.arange(n, device=self.hidden.device)
        logits = self.logits[:n]
        torch.mm(self.hidden.index_select(0, rows), self.weight_t, out=logits)
        return logits, self.rows[:n]


def from_logits(rows_kernel, logits, teacher, labels, *, alpha, temperature, reverse,
                ignore_index, want_grad):
    """``(loss, grad_logits)`` for callers that hold the student logits ``[N, V_s]``."""
    labels = labels.contiguous()
    inv_real = 1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
    rows = logits.shape[0]
    loss_dtype = torch.promote_types(logits.dtype, torch.float32)
    losses = torch.empty(rows, dtype=loss_dtype, device=logits.device)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) \
        if want_grad else logits
    teacher_rows = torch.arange(rows, device=logits.device)
    rows_kernel(logits, grad, teacher, teacher_rows, labels, losses,
                shared=min(logits.shape[1], teacher.shape[1]), alpha=alpha,
                temperature=temperature, reverse=reverse, ignore_index=ignore_index,
                grad_scale=inv_real, write_grad=want_grad)
    return losses.sum() * inv_real, (grad if want_grad else logits.new_empty(0))
