"""Distillation loss ops (DESIGN §4): check once, then run the chosen backend.

All three return the mean loss over the real rows (``labels != ignore_index``); the
gradients are computed in the forward pass (no ``[N, V]`` logits are kept for the
backward) and scaled by the incoming gradient in the backward.
"""

from __future__ import annotations

import torch

from ..argcheck import positive_int
from ..constants import DIVERGENCES, IGNORE_INDEX
from . import dispatch, library, validate


def _check_common(labels, n_rows, device, alpha, temperature, divergence, ignore_index):
    validate.tensor("labels", labels, ndim=1, layout="[N]", dtypes=validate.INDEX_DTYPES)
    if labels.shape[0] != n_rows:
        raise ValueError(f"labels must have shape [{n_rows}], got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device}, expected {device}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    validate.temperature(temperature)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_student_head(student_hidden, lm_head_weight, n_rows_name: str, others: dict):
    """``student_hidden [N, d]`` with ``lm_head_weight [V_s, d]`` on one device and dtype;
    ``others`` (name -> tensor) share their device. Returns ``N``."""
    validate.tensor("student_hidden", student_hidden, ndim=2, layout="[N, d_model]")
    validate.tensor("lm_head_weight", lm_head_weight, ndim=2, layout="[vocab, d_model]")
    validate.same_device(student_hidden=student_hidden, lm_head_weight=lm_head_weight, **others)
    validate.same_dtype(student_hidden=student_hidden, lm_head_weight=lm_head_weight)
    validate.dim_equals("lm_head_weight", lm_head_weight, 1, student_hidden.shape[1], "d_model")
    validate.nonempty("lm_head_weight", lm_head_weight, (0,), "vocabulary")
    n_rows = student_hidden.shape[0]
    validate.dim_equals(n_rows_name, others[n_rows_name], 0, n_rows, "rows")
    return n_rows


def _chunk(chunk_size) -> int:
    return positive_int("chunk_size", chunk_size, allow_none=True) or 0


def _wants(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def _run(op: str, args: tuple, differentiable: bool) -> torch.Tensor:
    if differentiable or torch.compiler.is_compiling():
        return library.call(op, *args)[0]
    return dispatch.run(op, args[0].device.type, *args)[0]


def distill_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "reverse_kl",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``alpha * tau^2 * KL + (1 - alpha) * CE`` with the student's LM head fused in.

    ``student_hidden`` ``[N, d]``, ``lm_head_weight`` ``[V_s, d]``, ``teacher_logits``
    ``[N, V_t]`` (any float dtype; the divergence uses the shared vocabulary prefix),
    ``labels`` ``[N]`` (``ignore_index`` rows contribute nothing). Mean over real rows.
    """
    validate.tensor("teacher_logits", teacher_logits, ndim=2, layout="[N, teacher_vocab]")
    n_rows = _check_student_head(student_hidden, lm_head_weight, "teacher_logits",
                                 {"teacher_logits": teacher_logits})
    validate.nonempty("teacher_logits", teacher_logits, (1,), "vocabulary")
    _check_common(labels, n_rows, student_hidden.device, alpha, temperature, divergence,
                  ignore_index)
    validate.labels_values(labels, lm_head_weight.shape[0], ignore_index)
    want_h, want_w = _wants(student_hidden), _wants(lm_head_weight)
    args = (student_hidden, lm_head_weight, teacher_logits, labels, float(alpha),
            float(temperature), divergence == "reverse_kl", ignore_index, _chunk(chunk_size),
            want_h, want_w)
    return _run("distill_loss", args, want_h or want_w)


def distill_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "reverse_kl",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The same loss for callers that already hold student logits ``[N, V_s]``."""
    validate.tensor("student_logits", student_logits, ndim=2, layout="[N, vocab]")
    validate.tensor("teacher_logits", teacher_logits, ndim=2, layout="[N, teacher_vocab]")
    validate.same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    n_rows = student_logits.shape[0]
    validate.dim_equals("teacher_logits", teacher_logits, 0, n_rows, "rows")
    validate.nonempty("student_logits", student_logits, (1,), "vocabulary")
    validate.nonempty("teacher_logits", teacher_logits, (1,), "vocabulary")
    _check_common(labels, n_rows, student_logits.device, alpha, temperature, divergence,
                  ignore_index)
    validate.labels_values(labels, student_logits.shape[1], ignore_index)
    want = _wants(student_logits)
    args = (student_logits, teacher_logits, labels, float(alpha), float(temperature),
            divergence == "reverse_kl", ignore_index, want)
    return _run("distill_loss_from_logits", args, want)


def distill_loss_from_teacher_hidden(student_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                                     teacher_hidden: torch.Tensor,
                                     teacher_head_weight: torch.Tensor, labels: torch.Tensor, *,
                                     alpha: float = 0.5, temperature: float = 1.0,
                                     divergence: str = "reverse_kl",
                                     ignore_index: int = IGNORE_INDEX,
                                     chunk_size: int | None = None) -> torch.Tensor:
    """:func:`distill_loss` with the teacher's LM head fused in too: the teacher logits
    ``teacher_hidden [N, d_t] @ teacher_head_weight[V_t, d_t].T`` are computed per chunk
    and never stored whole. No gradient flows to the teacher."""
    validate.tensor("teacher_hidden", teacher_hidden, ndim=2, layout="[N, teacher_d_model]")
    validate.tensor("teacher_head_weight", teacher_head_weight, ndim=2,
                    layout="[teacher_vocab, teacher_d_model]")
    n_rows = _check_student_head(student_hidden, lm_head_weight, "teacher_hidden",
                                 {"teacher_hidden": teacher_hidden,
                                  "teacher_head_weight": teacher_head_weight})
    validate.same_dtype(teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head_weight)
    validate.dim_equals("teacher_head_weight", teacher_head_weight, 1, teacher_hidden.shape[1],
                        "d_model (teacher)")
    validate.nonempty("teacher_head_weight", teacher_head_weight, (0,), "vocabulary")
    _check_common(labels, n_rows, student_hidden.device, alpha, temperature, divergence,
                  ignore_index)
    validate.labels_values(labels, lm_head_weight.shape[0], ignore_index)
    want_h, want_w = _wants(student_hidden), _wants(lm_head_weight)
    args = (student_hidden, lm_head_weight, teacher_hidden, teacher_head_weight, labels,
            float(alpha), float(temperature), divergence == "reverse_kl", ignore_index,
            _chunk(chunk_size), want_h, want_w)
    return _run("distill_loss_from_teacher_hidden", args, want_h or want_w)
