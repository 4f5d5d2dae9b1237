"""``TrainConfig``: every knob of :class:`~fastencdec.training.Trainer`, validated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .objective import DIVERGENCES

__all__ = ["TrainConfig", "TASKS"]

TASKS = ("finetune", "pretrain", "distill")


@dataclass
class TrainConfig:
    # what to train
    task: str = "finetune"            # finetune (CE) | pretrain (span corruption, CE) | distill
    max_steps: int = 1000             # optimizer steps
    grad_accum: int = 1               # micro-batches per optimizer step (per process)
    # optimizer and schedule
    optimizer: str = "muon"           # muon (+ AdamW for embeddings/norms/biases) | adamw
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    # numerics and memory
    precision: str = "auto"           # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    # multi-process (under torchrun)
    distributed: str = "ddp"          # ddp | fsdp
    # distillation (DESIGN §4)
    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "reverse_kl"
    on_policy: float = 0.0            # fraction of steps whose targets the student samples
    sample_temperature: float = 1.0
    max_new_tokens: int = 64
    # bookkeeping
    seed: int = 0
    out_dir: str | None = None        # checkpoints/, metrics.jsonl
    log_every: int = 10
    save_every: int = 0               # 0: only at the end (when out_dir is set)
    keep_last: int = 2
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("max_steps", "grad_accum", "log_every", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "save_every", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"on_policy must lie in [0, 1], got {self.on_policy}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**data)
