"""Optimizers: ``torch.optim.Muon`` for hidden weight matrices + AdamW for the rest.

Muon orthogonalises the update of a 2-D matrix, which suits the hidden linear
layers; embeddings (and the LM head tied to them), norms and biases stay on AdamW.
With ``adjust_lr_fn="match_rms_adamw"`` (the default here) Muon's update has
AdamW's RMS, so both can share one learning rate and schedule.

``build_optimizer`` returns a :class:`HybridOptimizer` that steps both and keeps
one ``param_groups`` list, so a schedule sets every group's lr in one place.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["split_params", "build_optimizer", "HybridOptimizer", "check_lr_multipliers"]


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Weights tied to an embedding (the LM head) are the same tensor object.
    return ids


def split_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters (deduplicated, tied ones once) sorted into groups.

    ``muon``: 2-D weights of hidden layers. ``adamw_decay``: embeddings. ``adamw_no_decay``:
    norms, biases and any other non-matrix tensor (no weight decay).
    """
    embedding_ids = _embedding_param_ids(model)
    groups: dict[str, list] = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in embedding_ids or "embed" in name or name.endswith(("wte.weight",
                                                                       "lm_head.weight")):
            groups["adamw_decay"].append((name, p))
        elif p.ndim == 2 and leaf == "weight":
            groups["muon"].append((name, p))
        else:
            groups["adamw_no_decay"].append((name, p))
    return groups


class HybridOptimizer:
    """Several ``torch.optim`` optimizers stepped together (e.g. Muon + AdamW).

    Offers what a training loop uses: ``step``, ``zero_grad``, ``param_groups`` (all
    optimizers' groups, the same dict objects), ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("HybridOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HybridOptimizer.step does not take a closure")
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("optimizers")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError("optimizer state does not match: expected "
                             f"{len(self.optimizers)} optimizers, got "
                             f"{None if states is None else len(states)}")
        for opt, s in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(s)

    def __repr__(self) -> str:
        names = ", ".join(type(o).__name__ for o in self.optimizers)
        return f"HybridOptimizer({names})"


def _part_of(name: str) -> str:
    return name.split(".", 1)[0]


def check_lr_multipliers(model: nn.Module, lr_multipliers) -> dict[str, float]:
    """``{part: factor}`` checked against ``model``'s top-level parts (its named
    children, e.g. a vision-language model's ``vision``, ``projector``, ``lm``):
    factors are finite numbers > 0."""
    if lr_multipliers is None:
        return {}
    if not isinstance(lr_multipliers, dict):
        raise TypeError(f"lr_multipliers must be a dict {{part: factor}}, got "
                        f"{type(lr_multipliers).__name__}")
    parts = [n for n, _ in model.named_children()]
    out = {}
    for part, factor in lr_multipliers.items():
        if part not in parts:
            raise ValueError(f"lr_multipliers: {type(model).__name__} has no part {part!r}; "
                             f"its parts: {', '.join(parts)}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"lr_multipliers[{part!r}] must be a finite number > 0, got "
                             f"{factor!r}")
        out[part] = float(factor)
    return out


def build_optimizer(
    model: nn.Module,
    *,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    use_muon: bool = True,
    muon_lr: float | None = None,
    muon_momentum: float = 0.95,
    muon_adjust_lr_fn: str = "match_rms_adamw",
    lr_multipliers: dict[str, float] | None = None,
) -> HybridOptimizer:
    """Muon (2-D hidden weights) + AdamW (the rest), or AdamW only with ``use_muon=False``.

    Only trainable parameters (``requires_grad``) are handed to the optimizers: a
    frozen part is never updated. ``lr_multipliers`` (``{part: factor}``, a part being
    a top-level child module such as a vision-language model's ``vision``) gives that
    part's parameters their own param groups with ``factor`` times the learning rate
    (Muon's too); a schedule scales every group alike, so the ratio holds throughout.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    multipliers = check_lr_multipliers(model, lr_multipliers)
    groups = split_params(model)
    if use_muon and not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Muon "
                           "(needs torch >= 2.9): set use_muon=False")
    if not use_muon:
        groups["adamw_decay"] += groups.pop("muon")
        groups["muon"] = []
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters")

    def by_factor(named) -> list[tuple[float, list]]:
        """``named`` split by lr factor (1.0 first), in parameter order."""
        split: dict[float, list] = {}
        for name, p in named:
            split.setdefault(multipliers.get(_part_of(name), 1.0), []).append(p)
        return sorted(split.items(), key=lambda kv: kv[0] != 1.0)

    adam_groups = []
    for key, decay in (("adamw_decay", weight_decay), ("adamw_no_decay", 0.0)):
        for factor, params in by_factor(groups[key]):
            group = {"params": params, "weight_decay": decay, "lr": lr * factor}
            if multipliers:
                group["lr_factor"] = factor
            adam_groups.append(group)
    optimizers = []
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps))
    if groups["muon"]:
        base = lr if muon_lr is None else muon_lr
        muon_groups = []
        for factor, params in by_factor(groups["muon"]):
            group = {"params": params, "lr": base * factor}
            if multipliers:
                group["lr_factor"] = factor
            muon_groups.append(group)
        optimizers.append(torch.optim.Muon(
            muon_groups, lr=base, weight_decay=weight_decay, momentum=muon_momentum,
            adjust_lr_fn=muon_adjust_lr_fn))
    return HybridOptimizer(optimizers)
