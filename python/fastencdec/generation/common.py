"""Input preparation shared by both ``generate`` functions."""

from __future__ import annotations

import torch

from ..models import inputs


def prepare_inputs(model, input_ids, attention_mask):
    """Validate ``input_ids``/``attention_mask`` against ``model``;
    returns (ids, bool mask or None)."""
    ids = inputs.token_ids("input_ids", input_ids, model.config.vocab_size)
    device = model.embed.weight.device
    if ids.device != device:
        raise ValueError(f"input_ids is on {ids.device} but the model is on {device}")
    return ids, inputs.attention_mask("attention_mask", attention_mask, ids)


def trim_trailing_padding(ids: torch.Tensor, mask: torch.Tensor | None):
    """Drop the columns after the last real token of every row (keeps at least one)."""
    if mask is None:
        return ids, None
    real_cols = mask.any(dim=0).nonzero()
    n = int(real_cols.max()) + 1 if real_cols.numel() else 1
    return ids[:, :n], mask[:, :n]


class eval_mode:
    """Run generation with dropout off, restoring the model's training flag after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
