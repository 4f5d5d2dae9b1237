"""What a distillation step needs from the teacher, without building its full logits.

A teacher that exposes its final hidden states and LM head gives a
:class:`~fastencdec.training.objective.TeacherHidden` (hidden states at the ``Ly``
positions that predict ``y`` + head weight), and the fused loss
``ops.distill_loss_from_teacher_hidden`` makes its logits chunk by chunk:

- a fastencdec ``DecoderOnlyLM`` (``hidden_states`` + ``lm_head.weight``), or an
  ``EncoderDecoderLM`` teacher (``encode``/``decode``);
- a Hugging Face causal LM whose logits are exactly ``lm_head(last_hidden_state)``
  (no head bias, soft-capping or logit scale): its base model (``model.model``,
  ``model.transformer``, ...) gives the hidden states, ``get_output_embeddings()``
  the head.

Any other causal LM falls back to its logits, asking for only the last ``Ly + 1``
positions (``logits_to_keep``) where the model supports it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .alignment import align_teacher_logits
from .objective import TeacherHidden, causal_lm_inputs, is_encoder_decoder, target_hidden_states

__all__ = ["teacher_targets", "teacher_logits_for", "teacher_vocab_size", "is_fastencdec_model",
           "hf_hidden_path"]

# Hugging Face config attributes that post-process logits after the LM head
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                         "output_multiplier_scale")


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def is_fastencdec_model(model: nn.Module) -> bool:
    return hasattr(model, "lm_head") and (hasattr(model, "hidden_states")
                                          or is_encoder_decoder(model))


def hf_hidden_path(model: nn.Module):
    """``(base_model, head_weight)`` when a Hugging Face causal LM's logits are exactly
    ``last_hidden_state @ head_weight.T``; None otherwise."""
    get_head = getattr(model, "get_output_embeddings", None)
    prefix = getattr(model, "base_model_prefix", None)
    if get_head is None or not prefix:
        return None
    head = get_head()
    base = getattr(model, prefix, None)
    if base is None or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    config = getattr(model, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, 0, 0.0):
            return None
    return base, head.weight


def teacher_vocab_size(teacher: nn.Module) -> int:
    if is_fastencdec_model(teacher):
        return int(teacher.lm_head.weight.shape[0])
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(teacher.config.vocab_size)


def _hf_position_kwargs(fn, inputs) -> dict:
    # Hugging Face models take positions explicitly (left padding must not shift them)
    return {"position_ids": inputs.position_ids} if _accepts(fn, "position_ids") else {}


@torch.no_grad()
def teacher_targets(teacher: nn.Module, batch: dict, pad_id: int, *,
                    vocab_map: torch.Tensor | None = None):
    """A :class:`TeacherHidden` when the teacher exposes hidden states and LM head, else
    its logits ``[B, Ly, V_t]``. ``vocab_map`` (``[V_student]`` teacher ids) reorders
    the teacher's vocabulary into the student's."""
    labels_len = batch["labels"].shape[1]
    if is_fastencdec_model(teacher):
        hidden = target_hidden_states(teacher, batch, pad_id)
        head = teacher.lm_head.weight
    else:
        inputs = causal_lm_inputs(batch, pad_id)
        mask = inputs.attention_mask.long()
        path = hf_hidden_path(teacher)
        if path is not None:
            base, head = path
            out = base(input_ids=inputs.input_ids, attention_mask=mask,
                       **_hf_position_kwargs(base.forward, inputs))
            states = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            hidden = align_teacher_logits(states, inputs.source_len, labels_len)
        else:
            logits = _hf_logits(teacher, inputs, mask, labels_len)
            if vocab_map is not None:
                logits = logits.index_select(-1, vocab_map.to(logits.device))
            return logits
    if vocab_map is not None:
        head = head.index_select(0, vocab_map.to(head.device))
    return TeacherHidden(hidden, head)


def _hf_logits(teacher, inputs, mask, labels_len):
    kwargs = {"input_ids": inputs.input_ids, "attention_mask": mask,
              **_hf_position_kwargs(teacher.forward, inputs)}
    if _accepts(teacher.forward, "logits_to_keep"):
        # the logits that predict y sit at Lx-1 .. Lx+Ly-2: the last Ly+1 positions
        kwargs["logits_to_keep"] = labels_len + 1
        out = teacher(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, :labels_len]
    out = teacher(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return align_teacher_logits(logits, inputs.source_len, labels_len)


@torch.no_grad()
def teacher_logits_for(teacher: nn.Module, batch: dict, pad_id: int) -> torch.Tensor:
    """The teacher's logits that predict ``y``: ``[B, Ly, V_t]`` (built whole: for
    checks and small models; training uses :func:`teacher_targets`)."""
    out = teacher_targets(teacher, batch, pad_id)
    if isinstance(out, TeacherHidden):
        return out.hidden @ out.head_weight.t().to(out.hidden.dtype)
    return out

