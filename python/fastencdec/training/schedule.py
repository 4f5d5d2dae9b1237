"""Linear warmup then cosine decay of the learning rate.

``warmup_cosine_factor`` is the multiplier alone (for ``torch.optim.lr_scheduler.LambdaLR``
in a user's loop); ``WarmupCosineSchedule`` applies it to anything with
``param_groups`` (a torch optimizer or a :class:`HybridOptimizer`).
"""

from __future__ import annotations

import math

from ..argcheck import int_at_least, positive_int

__all__ = ["warmup_cosine_factor", "WarmupCosineSchedule"]


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int,
                         min_ratio: float = 0.1) -> float:
    """lr multiplier for optimizer step ``step`` (0-based): ``(step+1)/warmup`` during
    warmup, then cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Call ``step()`` after each optimizer step. Base lrs are read once at creation."""

    def __init__(self, optimizer, *, warmup_steps: int, total_steps: int,
                 min_ratio: float = 0.1):
        warmup_steps = int_at_least("warmup_steps", warmup_steps, 0)
        total_steps = positive_int("total_steps", total_steps)
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self) -> float:
        return warmup_cosine_factor(self.last_step, warmup_steps=self.warmup_steps,
                                    total_steps=self.total_steps, min_ratio=self.min_ratio)

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs),
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_ratio": self.min_ratio}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position only: warmup, total and base lrs stay as configured now
        (so a resumed run may extend ``total_steps``)."""
        self.last_step = int(state["last_step"])
        self._apply()
