"""Aligning a decoder-only teacher with an encoder-decoder student (DESIGN §4).

The student encoder reads ``x``; its decoder reads ``[BOS] ∘ y[:-1]`` and predicts
``y``. The teacher reads ``pad ∘ x ∘ y ∘ pad``: ``x`` left-padded to the fixed
length ``Lx`` (so its last real token sits at ``Lx - 1``) and ``y`` right-padded.
The teacher logits at position ``Lx - 1 + t`` have seen ``x`` and ``y_<t``, the
same prefix as the student's decoder at step ``t``: the block that predicts ``y``
is ``teacher_logits[:, Lx-1 : Lx-1+Ly]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..argcheck import int_at_least, positive_int

__all__ = [
    "TeacherInputs",
    "StudentDecoderInputs",
    "build_teacher_inputs",
    "build_student_decoder_inputs",
    "align_teacher_logits",
]


class TeacherInputs(NamedTuple):
    input_ids: torch.Tensor       # [B, Lx + Ly]: pad ∘ x ∘ y ∘ pad
    attention_mask: torch.Tensor  # [B, Lx + Ly] bool, True = real token
    position_ids: torch.Tensor    # [B, Lx + Ly] int64: 0, 1, ... over the real tokens
    source_len: int               # Lx, pass to align_teacher_logits


class StudentDecoderInputs(NamedTuple):
    input_ids: torch.Tensor       # [B, Ly]: [BOS] ∘ y[:-1], pad where y is padding
    attention_mask: torch.Tensor  # [B, Ly] bool (equals the target mask)
    labels: torch.Tensor          # [B, Ly] int64: y, ignore_index where y is padding


def _check_ids_and_mask(ids_name, ids, mask_name, mask, min_len=1):
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"{ids_name} must be a 2-D tensor [batch, seq], got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{ids_name} must hold integer token ids, got {ids.dtype}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{mask_name} must be a bool tensor (True = real token)")
    if mask.shape != ids.shape:
        raise ValueError(f"{mask_name} has shape {list(mask.shape)} but {ids_name} has "
                         f"{list(ids.shape)}")
    if mask.device != ids.device:
        raise ValueError(f"{mask_name} is on {mask.device} but {ids_name} is on {ids.device}")
    if ids.shape[1] < min_len:
        raise ValueError(f"{ids_name} needs at least {min_len} position(s), got shape "
                         f"{list(ids.shape)}")


def _check_right_padded(name, mask):
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"{name} must be right-padded (real tokens first, then padding)")


def build_teacher_inputs(source_ids, source_mask, target_ids, target_mask, pad_id) -> TeacherInputs:
    """Teacher input ``pad ∘ x ∘ y ∘ pad`` with ``Lx = source_ids.shape[1]``.

    ``source_mask`` may pad ``x`` anywhere (its real tokens keep their order and
    are moved to the right end); ``target_mask`` must be right-padded. Every
    source row needs a real token: the teacher predicts ``y_0`` from the last one.
    """
    _check_ids_and_mask("source_ids", source_ids, "source_mask", source_mask)
    _check_ids_and_mask("target_ids", target_ids, "target_mask", target_mask)
    if target_ids.shape[0] != source_ids.shape[0]:
        raise ValueError(f"target_ids has batch {target_ids.shape[0]} but source_ids has "
                         f"{source_ids.shape[0]}")
    if target_ids.device != source_ids.device:
        raise ValueError(f"target_ids is on {target_ids.device} but source_ids is on "
                         f"{source_ids.device}")
    _check_right_padded("target_mask", target_mask)
    empty = (~source_mask.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(f"source_mask row {int(empty[0])} has no real token; the teacher "
                         "predicts y_0 from the last source token")

    # Stable sort on the mask: padding first, real tokens after, each in order.
    order = torch.sort(source_mask.to(torch.int8), dim=1, stable=True).indices
    x_mask = source_mask.gather(1, order)
    x_ids = source_ids.gather(1, order).masked_fill(~x_mask, pad_id)
    y_ids = target_ids.masked_fill(~target_mask, pad_id)

    input_ids = torch.cat([x_ids, y_ids.to(x_ids.dtype)], dim=1)
    attention_mask = torch.cat([x_mask, target_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return TeacherInputs(input_ids, attention_mask, position_ids, source_ids.shape[1])


def build_student_decoder_inputs(target_ids, target_mask, bos_id, pad_id,
                                 ignore_index=-100) -> StudentDecoderInputs:
    """Decoder inputs ``[BOS] ∘ y[:-1]`` and labels ``y`` (``ignore_index`` on padding).

    ``target_mask`` must be right-padded: decoder step ``t`` is real iff ``y_t`` is.
    """
    _check_ids_and_mask("target_ids", target_ids, "target_mask", target_mask)
    _check_right_padded("target_mask", target_mask)
    bos = torch.full_like(target_ids[:, :1], bos_id)
    shifted = torch.cat([bos, target_ids[:, :-1]], dim=1)
    input_ids = shifted.masked_fill(~target_mask, pad_id)
    labels = target_ids.long().masked_fill(~target_mask, ignore_index)
    return StudentDecoderInputs(input_ids, target_mask.clone(), labels)


def align_teacher_logits(teacher_logits, source_len, target_len) -> torch.Tensor:
    """The teacher logits that predict ``y``: ``teacher_logits[:, Lx-1 : Lx-1+Ly]`` (a view).

    ``teacher_logits`` ``[B, L, V]`` from the input of :func:`build_teacher_inputs`;
    ``source_len`` is ``Lx`` (``TeacherInputs.source_len``), ``target_len`` is ``Ly``.
    """
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 3:
        raise ValueError("teacher_logits must be a 3-D tensor [batch, seq, vocab], got "
                         f"{getattr(teacher_logits, 'shape', type(teacher_logits).__name__)}")
    source_len = positive_int("source_len", source_len)
    target_len = int_at_least("target_len", target_len, 0)
    seq_len = teacher_logits.shape[1]
    if source_len - 1 + target_len > seq_len:
        raise ValueError(
            f"teacher_logits has {seq_len} positions, but source_len={source_len} and "
            f"target_len={target_len} need at least {source_len - 1 + target_len} "
            "(the teacher input is x ∘ y with x padded to source_len)"
        )
    start = source_len - 1
    return teacher_logits[:, start : start + target_len]
