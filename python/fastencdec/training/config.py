"""``TrainConfig``: every knob of :class:`~fastencdec.training.Trainer`, validated.

Each field's type and range sit in :data:`FIELD_CHECKS`; ``TrainConfig(...)`` and
``TrainConfig.from_dict`` (unknown keys get a did-you-mean) check them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from .checks import ConfigError, check_value, unknown_keys_error
from .objective import DIVERGENCES

__all__ = ["TrainConfig", "TASKS", "OPTIMIZERS", "PRECISIONS", "EVAL_METRICS"]

TASKS = ("finetune", "pretrain", "distill")
OPTIMIZERS = ("auto", "muon", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# metric -> True when higher is better
EVAL_METRICS = {"loss": False, "exact_match": True, "token_f1": True, "rouge_l": True}
# the parts of a vision-language model (fastencdec.vision.models.PARTS)
VLM_PARTS = ("vision", "projector", "lm")


@dataclass
class TrainConfig:
    # what to train
    task: str = "finetune"            # finetune (CE) | pretrain (span corruption, CE) | distill
    max_steps: int = 1000             # optimizer steps
    grad_accum: int = 1               # micro-batches per optimizer step (per process)
    # optimizer and schedule
    optimizer: str = "auto"           # auto: muon on CUDA, adamw on the CPU | muon | adamw
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    # vision-language models: the two stages (stage 1: freeze_vision + freeze_lm, the
    # projector learns; stage 2: freeze_vision) and a part's own learning rate
    freeze_vision: bool = False       # the vision tower's weights stay as they are
    freeze_projector: bool = False
    freeze_lm: bool = False           # the language model (embeddings, LM head included)
    lr_multipliers: dict = dataclasses.field(default_factory=dict)  # e.g. {vision: 0.1}
    # numerics and memory
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    activation_checkpointing: bool = False
    compile: bool = False             # torch.compile the loss computation
    # multi-process (under torchrun)
    distributed: str = "ddp"          # ddp | fsdp
    # distillation (DESIGN §4)
    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "reverse_kl"
    on_policy: float = 0.0            # fraction of steps whose targets the student samples
    sample_temperature: float = 1.0
    max_new_tokens: int = 64
    # evaluation (needs an evaluator: see Trainer)
    eval_every: int = 0               # 0: only at the end
    best_metric: str = "loss"         # which eval metric picks the best model
    # bookkeeping
    seed: int = 0
    out_dir: str | None = None        # checkpoints/, metrics.jsonl, metrics.csv
    log_every: int = 10
    save_every: int = 0               # 0: only at the end (when out_dir is set)
    keep_last: int = 2
    progress: bool = True             # progress bar and log lines on the console
    overwrite: bool = False           # start over in an out_dir that holds another run

    def __post_init__(self):
        for name, (kind, options) in FIELD_CHECKS.items():
            setattr(self, name, check_value(f"training.{name}", getattr(self, name), kind,
                                            **options))
        multipliers = {}
        for part, factor in self.lr_multipliers.items():
            if part not in VLM_PARTS:
                raise unknown_keys_error("training.lr_multipliers", [part], VLM_PARTS)
            multipliers[part] = check_value(f"training.lr_multipliers.{part}", factor, "float",
                                            low=0.0, low_open=True)
        self.lr_multipliers = multipliers
        if self.freeze_vision and self.freeze_projector and self.freeze_lm:
            raise ConfigError("training.freeze_vision, freeze_projector and freeze_lm are all "
                              "true: nothing would train")
        frozen = [p for p in self.frozen_parts if p in self.lr_multipliers]
        if frozen:
            raise ConfigError(f"training.lr_multipliers.{frozen[0]}: that part is frozen "
                              f"(training.freeze_{frozen[0]}), so it has no learning rate")

    @property
    def frozen_parts(self) -> tuple[str, ...]:
        """The vision-language model parts the freeze flags name."""
        return tuple(p for p in VLM_PARTS if getattr(self, f"freeze_{p}"))

    @property
    def uses_vision_options(self) -> bool:
        return bool(self.frozen_parts or self.lr_multipliers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"training must be a mapping, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise unknown_keys_error("training", unknown, known)
        return cls(**data)

    def fingerprint(self, **extra) -> str:
        """A hash of everything that changes what a run computes (not how long it runs,
        how often it logs/saves/evaluates, or where): a resume checks it."""
        ident = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES
                 and not (k in HASHED_WHEN_SET and v == HASHED_WHEN_SET[k])}
        text = json.dumps({"training": ident, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# fields a resumed run may change without becoming a different run
RESUMABLE_CHANGES = ("max_steps", "log_every", "save_every", "keep_last", "progress",
                     "out_dir", "eval_every", "overwrite", "compile")
# fields added later, hashed only when they differ from these defaults (so checkpoints
# written before they existed keep their configuration hash)
HASHED_WHEN_SET = {"freeze_vision": False, "freeze_projector": False, "freeze_lm": False,
                   "lr_multipliers": {}}

FIELD_CHECKS = {
    "task": ("str", {"choices": TASKS}),
    "max_steps": ("int", {"low": 1}),
    "grad_accum": ("int", {"low": 1}),
    "optimizer": ("str", {"choices": OPTIMIZERS}),
    "lr": ("float", {"low": 0.0, "low_open": True}),
    "weight_decay": ("float", {"low": 0.0}),
    "betas": ("pair", {"low": 0.0, "high": 0.999999}),
    "warmup_steps": ("int", {"low": 0}),
    "min_lr_ratio": ("float", {"low": 0.0, "high": 1.0}),
    "max_grad_norm": ("float", {"low": 0.0, "low_open": True, "optional": True}),
    "freeze_vision": ("bool", {}),
    "freeze_projector": ("bool", {}),
    "freeze_lm": ("bool", {}),
    "lr_multipliers": ("mapping", {}),
    "precision": ("str", {"choices": PRECISIONS}),
    "activation_checkpointing": ("bool", {}),
    "compile": ("bool", {}),
    "distributed": ("str", {"choices": ("ddp", "fsdp")}),
    "alpha": ("float", {"low": 0.0, "high": 1.0}),
    "temperature": ("float", {"low": 1e-3, "high": 1e3}),
    "divergence": ("str", {"choices": DIVERGENCES}),
    "on_policy": ("float", {"low": 0.0, "high": 1.0}),
    "sample_temperature": ("float", {"low": 1e-3, "high": 1e3}),
    "max_new_tokens": ("int", {"low": 1}),
    "eval_every": ("int", {"low": 0}),
    "best_metric": ("str", {"choices": tuple(EVAL_METRICS)}),
    "seed": ("int", {"low": 0}),
    "out_dir": ("str", {"optional": True}),
    "log_every": ("int", {"low": 1}),
    "save_every": ("int", {"low": 0}),
    "keep_last": ("int", {"low": 1}),
    "progress": ("bool", {}),
    "overwrite": ("bool", {}),
}
assert set(FIELD_CHECKS) == {f.name for f in dataclasses.fields(TrainConfig)}
