"""The ``mlp2x_gelu`` projector: vision features -> the language model's width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Projector"]


class Projector(nn.Module):
    """``Linear(vision_width -> d_model), GELU, Linear(d_model -> d_model)``."""

    def __init__(self, vision_width: int, d_model: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_width, d_model)
        self.fc2 = nn.Linear(d_model, d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(features)))
