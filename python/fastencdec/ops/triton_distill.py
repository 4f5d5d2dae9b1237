"""Distillation loss on the Triton kernel, LM head fused in (Liger-style chunking).

The student logits never exist as one ``[N, V]`` tensor. The real rows
(``labels != ignore_index``) are cut into a few large chunks; per chunk the
forward pass runs ``logits = h_c @ W.T`` (cuBLAS, input dtype), the kernel turns
the chunk buffer into ``dloss/dlogits`` in place, and the two gradient GEMMs
consume it right away (``grad_h[c] = g @ W``, ``grad_W += g.T @ h_c``). The
backward pass only scales the stored gradients by ``grad_output``.

Chunks are few and large (about ``CHUNK_BUDGET_BYTES`` of logits each): every
chunk re-reads and re-writes the whole ``[V, d]`` weight gradient, which is what
makes small chunks slow for small N and d (mu-330m: d=1024, V=32128).
"""

from __future__ import annotations

import math

import torch

from fastencdec.kernels.distill_loss import distill_rows

__all__ = [
    "distill_loss",
    "distill_loss_from_logits",
    "distill_loss_from_teacher_hidden",
    "choose_chunk_rows",
    "CHUNK_BUDGET_BYTES",
]

CHUNK_BUDGET_BYTES = 256 * 2**20  # logits (+ teacher logits) held per chunk
_ROW_ALIGN = 64  # chunk rows are a multiple of this (GEMM tiles), except a single chunk


def choose_chunk_rows(n_rows: int, bytes_per_row: int, budget: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk: the fewest (equal) chunks whose buffers fit in ``budget`` bytes."""
    if n_rows <= 0:
        return 1
    n_chunks = max(1, math.ceil(n_rows * bytes_per_row / budget))
    rows = math.ceil(n_rows / n_chunks)
    if n_chunks > 1 and rows > _ROW_ALIGN:
        rows = math.ceil(rows / _ROW_ALIGN) * _ROW_ALIGN
    return max(1, min(rows, n_rows))


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _WeightGrad:
    """``Σ_c g_c.T @ h_c`` over chunks; fp32 accumulation for fp16/bf16 weights."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.acc = None  # [V, d]
        self.tmp = None  # per-chunk product in the input dtype (fp16/bf16 only)

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        if self.acc is None:  # first chunk: written straight into the result
            self.acc = g.t() @ h
            return
        if self.acc.dtype == self.weight.dtype and self.weight.dtype != torch.float32:
            self.acc = self.acc.float()  # a second chunk arrived: switch to fp32
        if self.acc.dtype == g.dtype:
            self.acc.addmm_(g.t(), h)
        else:
            if self.tmp is None:
                self.tmp = torch.empty(self.weight.shape, dtype=g.dtype, device=g.device)
            torch.mm(g.t(), h, out=self.tmp)
            self.acc.add_(self.tmp)

    def result(self) -> torch.Tensor:
        self.tmp = None
        if self.acc is None:
            return torch.zeros_like(self.weight)
        return self.acc.to(self.weight.dtype)


def _fused_forward(hidden, weight, teacher_for_chunk, shared, teacher_row_bytes, labels, *,
                   alpha, temperature, divergence, ignore_index, chunk_size,
                   grad_hidden_wanted, grad_weight_wanted):
    """Loss and (optionally) the gradients w.r.t. ``hidden`` and ``weight``, already
    divided by the number of real rows.

    ``teacher_for_chunk(rows)`` returns ``(teacher, teacher_rows)`` for the given
    original row indices: the kernel reads row ``teacher_rows[r]`` of ``teacher``.
    """
    device, vocab = hidden.device, weight.shape[0]
    labels = labels.contiguous()  # the kernel reads labels[r] at unit stride
    write_grad = grad_hidden_wanted or grad_weight_wanted
    real = labels != ignore_index
    all_real = bool(real.all())
    rows_real = (torch.arange(labels.shape[0], device=device) if all_real
                 else real.nonzero().squeeze(1))
    n_real = rows_real.numel()

    loss = torch.zeros((), dtype=torch.float32, device=device)
    grad_hidden = None
    if grad_hidden_wanted:  # contiguous, so that chunk slices are valid ``out=`` targets
        make = torch.empty if all_real else torch.zeros
        grad_hidden = make(hidden.shape, dtype=hidden.dtype, device=device)
    grad_weight = _WeightGrad(weight) if grad_weight_wanted else None
    if n_real == 0:
        return loss, grad_hidden, (grad_weight.result() if grad_weight else None)

    bytes_per_row = vocab * hidden.element_size() + teacher_row_bytes
    rows_per_chunk = (min(int(chunk_size), n_real) if chunk_size
                      else choose_chunk_rows(n_real, bytes_per_row))
    logits_buf = torch.empty(rows_per_chunk, vocab, dtype=hidden.dtype, device=device)
    losses = torch.empty(rows_per_chunk, dtype=torch.float32, device=device)
    labels_real = labels if all_real else labels[rows_real]
    weight_t = weight.t()

    for start in range(0, n_real, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_real)
        rows = rows_real[start:stop]
        h_c = hidden[start:stop] if all_real else hidden.index_select(0, rows)
        logits = logits_buf[: stop - start]
        torch.mm(h_c, weight_t, out=logits)
        teacher, teacher_rows = teacher_for_chunk(rows)
        distill_rows(logits, logits, teacher, teacher_rows, labels_real[start:stop],
                     losses[: stop - start], shared=shared, alpha=alpha,
                     temperature=temperature, reverse=divergence == "reverse_kl",
                     ignore_index=ignore_index, grad_scale=1.0 / n_real, write_grad=write_grad)
        loss += losses[: stop - start].sum()
        if grad_hidden_wanted:
            if all_real:
                torch.mm(logits, weight, out=grad_hidden[start:stop])
            else:
                grad_hidden.index_copy_(0, rows, logits @ weight)
        if grad_weight_wanted:
            grad_weight.add(logits, h_c)
    return (loss / n_real, grad_hidden,
            grad_weight.result() if grad_weight_wanted else None)


class _FusedDistillLoss(torch.autograd.Function):
    """Gradients are computed in the forward pass; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, run):
        loss, grad_hidden, grad_weight = run(*ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype),
            None,
        )


def _run_fused(hidden, weight, teacher_for_chunk, shared, teacher_row_bytes, labels, kwargs):
    def run(grad_hidden_wanted, grad_weight_wanted):
        return _fused_forward(hidden.detach(), weight.detach(), teacher_for_chunk, shared,
                              teacher_row_bytes, labels, **kwargs,
                              grad_hidden_wanted=grad_hidden_wanted,
                              grad_weight_wanted=grad_weight_wanted)

    if _wants_grad(hidden, weight):
        return _FusedDistillLoss.apply(hidden, weight, run)
    return run(False, False)[0]


def distill_loss(student_hidden, lm_head_weight, teacher_logits, labels, *, alpha=0.5,
                 temperature=1.0, divergence="reverse_kl", ignore_index=-100, chunk_size=None):
    """See ``fastencdec.ops.distill_loss``. Teacher logits are read in place (any float
    dtype, any strides): only the shared vocabulary prefix of the real rows is touched."""
    teacher = teacher_logits.detach()
    shared = min(lm_head_weight.shape[0], teacher.shape[1])

    def teacher_for_chunk(rows):
        return teacher, rows

    kwargs = dict(alpha=float(alpha), temperature=float(temperature), divergence=divergence,
                  ignore_index=int(ignore_index), chunk_size=chunk_size)
    return _run_fused(student_hidden, lm_head_weight, teacher_for_chunk, shared, 0, labels,
                      kwargs)


def distill_loss_from_teacher_hidden(student_hidden, lm_head_weight, teacher_hidden,
                                     teacher_head_weight, labels, *, alpha=0.5, temperature=1.0,
                                     divergence="reverse_kl", ignore_index=-100,
                                     chunk_size=None):
    """Both LM heads fused: the teacher logits are computed per chunk too (only the
    shared vocabulary prefix), so neither model's ``[N, V]`` logits are ever stored."""
    shared = min(lm_head_weight.shape[0], teacher_head_weight.shape[0])
    t_hidden = teacher_hidden.detach()
    t_weight_t = teacher_head_weight.detach()[:shared].t()
    buf = {}

    def teacher_for_chunk(rows):
        n = rows.numel()
        if "logits" not in buf or buf["logits"].shape[0] < n:
            buf["logits"] = torch.empty(n, shared, dtype=t_hidden.dtype, device=t_hidden.device)
            buf["rows"] = torch.arange(n, device=t_hidden.device)
        logits = buf["logits"][:n]
        torch.mm(t_hidden.index_select(0, rows), t_weight_t, out=logits)
        return logits, buf["rows"][:n]

    kwargs = dict(alpha=float(alpha), temperature=float(temperature), divergence=divergence,
                  ignore_index=int(ignore_index), chunk_size=chunk_size)
    return _run_fused(student_hidden, lm_head_weight, teacher_for_chunk, shared,
                      shared * teacher_hidden.element_size(), labels, kwargs)


def _logits_forward(logits, teacher, labels, shared, kwargs, write_grad):
    labels = labels.contiguous()
    n_real = max(int((labels != kwargs["ignore_index"]).sum()), 1)
    rows = logits.shape[0]
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) \
        if write_grad else logits
    teacher_rows = torch.arange(rows, device=logits.device)
    distill_rows(logits, grad, teacher, teacher_rows, labels, losses, shared=shared,
                 grad_scale=1.0 / n_real, write_grad=write_grad, **kwargs)
    return losses.sum() / n_real, (grad if write_grad else None)


class _LogitsDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher, labels, shared, kwargs):
        loss, grad = _logits_forward(logits.detach(), teacher, labels, shared, kwargs, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def distill_loss_from_logits(student_logits, teacher_logits, labels, *, alpha=0.5,
                             temperature=1.0, divergence="reverse_kl", ignore_index=-100):
    """See ``fastencdec.ops.distill_loss_from_logits``; the gradient w.r.t. the student
    logits is computed in the forward pass (one extra ``[N, V_s]`` buffer)."""
    logits = student_logits if student_logits.stride(1) == 1 else student_logits.contiguous()
    teacher = teacher_logits.detach()
    shared = min(logits.shape[1], teacher.shape[1])
    kwargs = dict(alpha=float(alpha), temperature=float(temperature),
                  reverse=divergence == "reverse_kl", ignore_index=int(ignore_index))
    if _wants_grad(student_logits):
        return _LogitsDistillLoss.apply(logits, teacher, labels, shared, kwargs)
    return _logits_forward(logits.detach(), teacher, labels, shared, kwargs, False)[0]
