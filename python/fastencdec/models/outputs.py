"""What a model's ``forward`` returns, and the loss it computes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX  # noqa: F401  (re-exported for models)


@dataclass
class LMOutput:
    """``logits`` ``[B, T, vocab]`` (the model's dtype); ``loss``: mean CE over the
    positions whose label is not ``-100`` (fp32), or None without labels."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy in fp32 (float64 stays float64), ignoring
    ``IGNORE_INDEX``; 0 (with a graph) when every label is ignored, where
    ``F.cross_entropy`` would return NaN."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(compute), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    n_real = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return losses / n_real
