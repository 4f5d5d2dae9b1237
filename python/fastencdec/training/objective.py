"""Losses for one seq2seq batch: cross-entropy and distillation (DESIGN §4).

A batch is what :class:`~fastencdec.data.Seq2SeqCollator` makes: ``input_ids`` /
``attention_mask`` (the source ``x``), ``decoder_input_ids`` / ``decoder_attention_mask``
(``[BOS] ∘ y[:-1]``) and ``labels`` (``y``, -100 on padding).

- An encoder-decoder student reads ``x`` in its encoder and ``[BOS] ∘ y[:-1]`` in
  its decoder.
- A decoder-only model (a teacher, or the decoder-only baseline) reads
  ``pad ∘ x ∘ y`` (:func:`build_teacher_inputs`) and is scored at the positions
  that predict ``y`` (:func:`align_teacher_logits`), so both architectures are
  trained and compared on exactly the same targets.

:class:`StudentLoss` is an ``nn.Module`` so that DDP/FSDP wrap the whole loss
computation (the LM head weight is used inside ``forward``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..data.collate import IGNORE_INDEX
from .alignment import align_teacher_logits, build_student_decoder_inputs, build_teacher_inputs

__all__ = [
    "StudentLoss",
    "is_encoder_decoder",
    "target_ids_and_mask",
    "causal_lm_inputs",
    "target_hidden_states",
    "image_inputs",
    "TeacherHidden",
    "chunked_cross_entropy",
    "sample_student_targets",
    "DIVERGENCES",
]

DIVERGENCES = ("reverse_kl", "forward_kl")


def is_encoder_decoder(model: nn.Module) -> bool:
    return hasattr(model, "encode") and hasattr(model, "decode")


def target_ids_and_mask(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` (pad where ignored) and its right-padded mask from ``batch["labels"]``."""
    labels = batch["labels"]
    mask = labels != IGNORE_INDEX
    return labels.masked_fill(~mask, pad_id), mask


def causal_lm_inputs(batch: dict, pad_id: int):
    """``pad ∘ x ∘ y`` for a decoder-only model (see ``build_teacher_inputs``)."""
    y, y_mask = target_ids_and_mask(batch, pad_id)
    return build_teacher_inputs(batch["input_ids"], batch["attention_mask"].bool(), y, y_mask,
                                pad_id)


def image_inputs(batch: dict) -> dict:
    """The batch entries whose key starts with ``image`` (``image_pixels``,
    ``image_crops``, ...): passed as keyword arguments to a model's ``encode`` (an
    encoder-decoder) or ``hidden_states`` (a decoder-only model)."""
    return {k: v for k, v in batch.items() if k.startswith("image")}


def _lm_head_weight(model: nn.Module) -> torch.Tensor:
    head = getattr(model, "lm_head", None)
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no lm_head.weight for the fused loss")
    return head.weight


def target_hidden_states(model: nn.Module, batch: dict, pad_id: int) -> torch.Tensor:
    """A fastencdec model's final hidden states at the positions that predict ``y``:
    ``[B, Ly, d]`` (an encoder-decoder's decoder states; a decoder-only model's states
    of ``pad ∘ x ∘ y`` aligned as in DESIGN §4)."""
    images = image_inputs(batch)
    if is_encoder_decoder(model):
        enc_mask = batch["attention_mask"].bool()
        states = model.encode(batch["input_ids"], enc_mask, **images)
        return model.decode(batch["decoder_input_ids"], states, enc_mask,
                            batch["decoder_attention_mask"].bool())
    inputs = causal_lm_inputs(batch, pad_id)
    hidden = model.hidden_states(inputs.input_ids, inputs.attention_mask, **images)
    return align_teacher_logits(hidden, inputs.source_len, batch["labels"].shape[1])


class TeacherHidden(NamedTuple):
    """A teacher's final hidden states at the positions that predict ``y`` and its LM
    head: the fused loss makes the teacher logits chunk by chunk, never whole."""

    hidden: torch.Tensor       # [B, Ly, d_teacher]
    head_weight: torch.Tensor  # [V_teacher, d_teacher] (rows mapped to student ids if asked)


class StudentLoss(nn.Module):
    """Mean loss over the real target tokens of a batch, for either architecture.

    ``forward(batch, teacher=None)``: cross-entropy on ``y`` without a teacher; with
    teacher logits ``[B, Ly, V]`` (``fastencdec.ops.distill_loss``) or a
    :class:`TeacherHidden` (``fastencdec.ops.distill_loss_from_teacher_hidden``) the
    distillation loss ``alpha * τ² * KL + (1 - alpha) * CE`` on the student's final
    hidden states and (tied) LM head weight. Returns ``(loss, n_tokens)``, or
    ``(loss, n_tokens, ce)`` with ``with_ce=True`` (``ce``: the detached cross-entropy
    part, for logging). Batch entries named ``image*`` go to the model's ``encode`` /
    ``hidden_states``.
    """

    def __init__(self, model: nn.Module, *, alpha: float = 0.5, temperature: float = 1.0,
                 divergence: str = "reverse_kl"):
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.alpha = alpha
        self.temperature = temperature
        self.divergence = divergence

    @property
    def pad_id(self) -> int:
        return self.model.config.pad_token_id

    def target_hidden(self, batch: dict) -> torch.Tensor:
        """The student's final hidden states at the positions predicting ``y``: ``[B, Ly, d]``."""
        return target_hidden_states(self.model, batch, self.pad_id)

    def forward(self, batch: dict, teacher=None, *, with_ce: bool = False):
        labels = batch["labels"]
        hidden = self.target_hidden(batch)
        real = (labels != IGNORE_INDEX).reshape(-1)
        n_tokens = int(real.sum())
        hidden = hidden.reshape(-1, hidden.shape[-1])[real]
        flat_labels = labels.reshape(-1)[real]
        weight = _lm_head_weight(self.model).to(hidden.dtype)
        if teacher is None:
            logits = hidden @ weight.t()
            loss = F.cross_entropy(logits.float(), flat_labels, reduction="sum") / max(n_tokens, 1)
            return (loss, n_tokens, loss.detach()) if with_ce else (loss, n_tokens)
        if isinstance(teacher, TeacherHidden):
            if teacher.hidden.shape[:2] != labels.shape:
                raise ValueError(f"teacher hidden states must be [batch, target_len, d] = "
                                 f"{list(labels.shape)} + [d], got {list(teacher.hidden.shape)}")
            t_hidden = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])[real]
            loss = ops.distill_loss_from_teacher_hidden(
                hidden, weight, t_hidden, teacher.head_weight.to(t_hidden.dtype), flat_labels,
                alpha=self.alpha, temperature=self.temperature, divergence=self.divergence,
                ignore_index=IGNORE_INDEX)
        else:
            if teacher.shape[:2] != labels.shape:
                raise ValueError(f"teacher_logits must be [batch, target_len, vocab] = "
                                 f"{list(labels.shape)} + [V], got {list(teacher.shape)}")
            t_logits = teacher.reshape(-1, teacher.shape[-1])[real]
            loss = ops.distill_loss(hidden, weight, t_logits, flat_labels,
                                    alpha=self.alpha, temperature=self.temperature,
                                    divergence=self.divergence, ignore_index=IGNORE_INDEX)
        if not with_ce:
            return loss, n_tokens
        return loss, n_tokens, chunked_cross_entropy(hidden.detach(), weight.detach(),
                                                     flat_labels)


@torch.no_grad()
def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_rows: int = 1024) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` against ``labels`` without building all logits."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[start:start + chunk_rows] @ weight.t()).float()
        total += F.cross_entropy(logits, labels[start:start + chunk_rows], reduction="sum")
    return total / max(hidden.shape[0], 1)


@torch.no_grad()
def sample_student_targets(student: nn.Module, batch: dict, *, max_new_tokens: int,
                           temperature: float = 1.0, top_k: int | None = None,
                           top_p: float | None = None,
                           generator: torch.Generator | None = None) -> dict:
    """On-policy targets: the batch with ``y`` replaced by the student's own samples
    (ending with EOS where it stopped), decoder inputs and labels rebuilt to match. A
    vision-language student reads the batch's images (``image*`` entries) too."""
    config = student.config
    new = student.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                           max_new_tokens=max_new_tokens, do_sample=True,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_token_id=config.eos_token_id, generator=generator,
                           **image_inputs(batch))
    # real = every token up to and including the first EOS
    is_eos = new == config.eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    built = build_student_decoder_inputs(new, mask, config.bos_token_id, config.pad_token_id,
                                         IGNORE_INDEX)
    out = dict(batch)
    out.update(decoder_input_ids=built.input_ids, decoder_attention_mask=built.attention_mask,
               labels=built.labels)
    return out
