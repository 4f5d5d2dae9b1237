"""Distillation loss ops (DESIGN §4): validate, then run the chosen backend."""

from __future__ import annotations

import torch

from ..reference.distill import DIVERGENCES
from . import dispatch, validate


def _check_common(labels, n_rows, device, alpha, temperature, divergence, ignore_index):
    validate.tensor("labels", labels, ndim=1, layout="[N]", dtypes=validate.INDEX_DTYPES)
    if labels.shape[0] != n_rows:
        raise ValueError(f"labels must have shape [{n_rows}], got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device}, expected {device}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_labels_range(labels, vocab, ignore_index):
    if not validate.can_read_values(labels):
        return
    real = labels[labels != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, "
            f"got values in [{int(real.min())}, {int(real.max())}]"
        )


def distill_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "reverse_kl",
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``alpha * tau^2 * KL + (1 - alpha) * CE`` with the student's LM head fused in.

    ``student_hidden`` ``[N, d]``, ``lm_head_weight`` ``[V_s, d]``, ``teacher_logits``
    ``[N, V_t]`` (any float dtype; the divergence uses the shared vocabulary prefix),
    ``labels`` ``[N]`` (``ignore_index`` rows contribute nothing). Mean over real rows.
    """
    validate.tensor("student_hidden", student_hidden, ndim=2, layout="[N, d_model]")
    validate.tensor("lm_head_weight", lm_head_weight, ndim=2, layout="[vocab, d_model]")
    validate.tensor("teacher_logits", teacher_logits, ndim=2, layout="[N, teacher_vocab]")
    validate.same_device(student_hidden=student_hidden, lm_head_weight=lm_head_weight,
                         teacher_logits=teacher_logits)
    validate.same_dtype(student_hidden=student_hidden, lm_head_weight=lm_head_weight)
    n_rows = student_hidden.shape[0]
    validate.dim_equals("lm_head_weight", lm_head_weight, 1, student_hidden.shape[1], "d_model")
    validate.dim_equals("teacher_logits", teacher_logits, 0, n_rows, "rows")
    validate.nonempty("lm_head_weight", lm_head_weight, (0,), "vocabulary")
    validate.nonempty("teacher_logits", teacher_logits, (1,), "vocabulary")
    _check_common(labels, n_rows, student_hidden.device, alpha, temperature, divergence,
                  ignore_index)
    _check_labels_range(labels, lm_head_weight.shape[0], ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return dispatch.call(
        "distill_loss", student_hidden, lm_head_weight, teacher_logits, labels,
        alpha=alpha, temperature=temperature, divergence=divergence,
        ignore_index=ignore_index, chunk_size=chunk_size,
        device=student_hidden.device,
        needs_grad=dispatch.needs_grad(student_hidden, lm_head_weight),
        fallback_reason=("float64 inputs have no kernel"
                         if student_hidden.dtype == torch.float64 else None),
    )


def distill_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "reverse_kl",
    ignore_index: int = -100,
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
    _check_labels_range(labels, student_logits.shape[1], ignore_index)
    return dispatch.call(
        "distill_loss_from_logits", student_logits, teacher_logits, labels,
        alpha=alpha, temperature=temperature, divergence=divergence, ignore_index=ignore_index,
        device=student_logits.device, needs_grad=dispatch.needs_grad(student_logits),
        fallback_reason=("float64 inputs have no kernel"
                         if student_logits.dtype == torch.float64 else None),
    )


def distill_loss_from_teacher_hidden(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "reverse_kl",
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`distill_loss` with the teacher's LM head fused in too: the teacher logits
    ``teacher_hidden [N, d_t] @ teacher_head_weight[V_t, d_t].T`` are computed per chunk
    and never stored whole. No gradient flows to the teacher."""
    validate.tensor("student_hidden", student_hidden, ndim=2, layout="[N, d_model]")
    validate.tensor("lm_head_weight", lm_head_weight, ndim=2, layout="[vocab, d_model]")
    validate.tensor("teacher_hidden", teacher_hidden, ndim=2, layout="[N, teacher_d_model]")
    validate.tensor("teacher_head_weight", teacher_head_weight, ndim=2,
                    layout="[teacher_vocab, teacher_d_model]")
    validate.same_device(student_hidden=student_hidden, lm_head_weight=lm_head_weight,
                         teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head_weight)
    validate.same_dtype(student_hidden=student_hidden, lm_head_weight=lm_head_weight)
    validate.same_dtype(teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head_weight)
    n_rows = student_hidden.shape[0]
    validate.dim_equals("lm_head_weight", lm_head_weight, 1, student_hidden.shape[1], "d_model")
    validate.dim_equals("teacher_hidden", teacher_hidden, 0, n_rows, "rows")
    validate.dim_equals("teacher_head_weight", teacher_head_weight, 1, teacher_hidden.shape[1],
                        "d_model (teacher)")
    validate.nonempty("lm_head_weight", lm_head_weight, (0,), "vocabulary")
    validate.nonempty("teacher_head_weight", teacher_head_weight, (0,), "vocabulary")
    _check_common(labels, n_rows, student_hidden.device, alpha, temperature, divergence,
                  ignore_index)
    _check_labels_range(labels, lm_head_weight.shape[0], ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    has_f64 = torch.float64 in (student_hidden.dtype, teacher_hidden.dtype)
    return dispatch.call(
        "distill_loss_from_teacher_hidden", student_hidden, lm_head_weight, teacher_hidden,
        teacher_head_weight, labels,
        alpha=alpha, temperature=temperature, divergence=divergence,
        ignore_index=ignore_index, chunk_size=chunk_size,
        device=student_hidden.device,
        needs_grad=dispatch.needs_grad(student_hidden, lm_head_weight),
        fallback_reason="float64 inputs have no kernel" if has_f64 else None,
    )
