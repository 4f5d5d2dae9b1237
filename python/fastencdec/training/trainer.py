"""The training loop: seq2seq fine-tuning, span-corruption pretraining, distillation.

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size``
processes. The loss of a step is the mean over all its real target tokens (every
micro-batch, every process), so 2 processes x 1 micro-batch and 1 process x 2
micro-batches make the same update.

Everything a resume needs is checkpointed (model, optimizer, schedule, grad
scaler, RNG states of every process, data position, best eval so far), so a
resumed run reproduces the uninterrupted one's losses exactly. Each checkpoint
records the run's id and a hash of its configuration: a resume refuses a
checkpoint of a different configuration, and pruning only touches this run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
import uuid
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..models.meta_init import on_meta
from .activation_checkpointing import enable_activation_checkpointing
from .checkpoint import CheckpointError, CheckpointManager, capture_rng_state, restore_rng_state
from .config import EVAL_METRICS, TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    full_model_state,
    full_optimizer_state,
    load_full_state,
    no_grad_sync,
    unwrap_model,
    wrap_model,
)
from .interrupt import StopOnSignal, TrainingInterrupted
from .metrics import IntervalMeans, MetricsLogger, ProgressBar, format_log_line
from .objective import StudentLoss, sample_student_targets
from .optim import build_optimizer
from .run_dir import prepare_output_dir, public_file_modes
from .schedule import WarmupCosineSchedule
from .teacher import teacher_targets, teacher_vocab_size

__all__ = ["Trainer", "resolve_optimizer"]

OPTIMIZER_NOTES = {
    ("auto", "cpu"): "AdamW (the default on the CPU, where Muon's orthogonalisation makes "
                     "each step slower; set optimizer: muon to use it)",
    ("auto", "cuda"): "Muon for hidden matrices + AdamW for embeddings/norms/biases (the "
                      "default on CUDA)",
}


def resolve_optimizer(name: str, device: torch.device) -> str:
    """``auto``: Muon on CUDA, AdamW elsewhere."""
    if name != "auto":
        return name
    return "muon" if device.type == "cuda" else "adamw"


def _current_dist(device) -> DistInfo:
    """The running process group (if any) or one process on ``device`` (default: CUDA
    when available)."""
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() and dist.get_backend() == "nccl" else torch.device("cpu")
        return DistInfo(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                        world_size=dist.get_world_size(), device=device)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available here")
    return DistInfo(device=device)


def _to_device(value, device: torch.device):
    """Tensors (also inside lists, tuples and dicts) moved to ``device``."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class Trainer:
    """Train ``model`` (an ``EncoderDecoderLM`` or a ``DecoderOnlyLM``) on ``data``.

    ``data``: an iterator of collated batches (e.g. :class:`~fastencdec.data.BatchStream`;
    with ``state_dict``/``load_state_dict`` it resumes at the right batch). Batch
    entries named ``image*`` are moved to the device and passed to the model.
    ``teacher``: for ``task="distill"``, a fastencdec model or a Hugging Face causal
    LM with the student's tokenizer (``teacher_vocab_map``: ``[V_student]`` teacher
    ids when the ids differ). ``evaluator``: a callable ``model -> dict`` of held-out
    metrics (:class:`~fastencdec.training.evaluation.Evaluator`), run every
    ``eval_every`` steps and at the end; the best model by ``best_metric`` is saved
    to ``out_dir/best_model``. ``fingerprint``: extra plain values (data, tokenizer
    settings) that make a run different, hashed with the config. ``dist_info``: from
    :func:`init_distributed` (default: the running process group, or one process on
    ``device``, CUDA when available).

    A vision-language model (``fastencdec.vision``) trains in stages through the
    config: ``freeze_vision`` / ``freeze_projector`` / ``freeze_lm`` stop that part's
    gradients (``requires_grad_(False)`` on the model given; the optimizer never sees
    it) and ``lr_multipliers`` (``{part: factor}``) gives a part its own learning rate.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, data, *,
                 teacher: nn.Module | None = None, dist_info: DistInfo | None = None,
                 device: str | torch.device | None = None, evaluator=None,
                 fingerprint: dict | None = None,
                 teacher_vocab_map: torch.Tensor | None = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.task == "distill" and teacher is None:
            raise ValueError("task='distill' needs a teacher model")
        if config.task == "distill" and config.on_policy > 0 and config.distributed == "fsdp":
            raise ValueError("on_policy sampling needs the whole student on each process: "
                             "use distributed='ddp'")
        self.config = config
        if dist_info is not None and device is not None:
            raise ValueError("pass either dist_info or device, not both")
        self.dist = dist_info or _current_dist(device)
        self.device = self.dist.device
        self._seed_everything(config.seed + self.dist.rank)
        self.notes: list[str] = []  # the choices made, for the log

        self.student = model.to(self.device)
        self.student.train()
        self._apply_vision_options(config)
        if config.activation_checkpointing:
            enable_activation_checkpointing(self.student)
        self.loss_module = StudentLoss(self.student, alpha=config.alpha,
                                       temperature=config.temperature,
                                       divergence=config.divergence)
        self.model = wrap_model(self.loss_module, config.distributed, self.dist)
        self._forward = self.model
        if config.compile:
            self._forward = torch.compile(self.model)
            self.notes.append("torch.compile: on")
        self.teacher = None
        self.teacher_vocab_map = teacher_vocab_map
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
            self._check_teacher_vocab()
        self.optimizer_name = resolve_optimizer(config.optimizer, self.device)
        note = OPTIMIZER_NOTES.get((config.optimizer, self.device.type),
                                   {"muon": "Muon + AdamW", "adamw": "AdamW"}[self.optimizer_name])
        self.notes.append(f"optimizer: {note}")
        self.optimizer = build_optimizer(self.student, lr=config.lr,
                                         weight_decay=config.weight_decay, betas=config.betas,
                                         use_muon=self.optimizer_name == "muon",
                                         lr_multipliers=config.lr_multipliers or None)
        self.scheduler = WarmupCosineSchedule(self.optimizer, warmup_steps=config.warmup_steps,
                                              total_steps=config.max_steps,
                                              min_ratio=config.min_lr_ratio)
        self.amp_dtype = self._resolve_precision()
        self.scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None)
        self.data = data
        self.evaluator = evaluator
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.best: dict | None = None
        self.summary: dict | None = None
        self._started = False
        self.run_id = uuid.uuid4().hex[:12]
        model_config = getattr(self.student, "config", None)
        self.config_hash = config.fingerprint(
            model=model_config.to_dict() if hasattr(model_config, "to_dict") else None,
            optimizer_resolved=self.optimizer_name, **(fingerprint or {}))
        out = config.out_dir
        self.checkpoints = None if out is None else CheckpointManager(
            os.path.join(out, "checkpoints"), keep_last=config.keep_last, rank=self.dist.rank,
            world_size=self.dist.world_size, barrier=barrier, run_id=self.run_id,
            config_hash=self.config_hash)
        self.metrics = MetricsLogger(None)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _apply_vision_options(self, config: TrainConfig) -> None:
        """The freeze flags (a named part stops requiring gradients, so the optimizer
        never sees it) and the check that ``lr_multipliers`` names parts the model has."""
        if not config.uses_vision_options:
            return
        missing = [p for p in (*config.frozen_parts, *config.lr_multipliers)
                   if not isinstance(getattr(self.student, p, None), nn.Module)]
        if missing:
            flag = (f"training.freeze_{missing[0]}" if missing[0] in config.frozen_parts
                    else f"training.lr_multipliers.{missing[0]}")
            raise ValueError(f"{flag}: {type(self.student).__name__} has no {missing[0]!r} "
                             "part (the freeze flags and lr_multipliers are for "
                             "vision-language models: vision, projector, lm)")
        for part in config.frozen_parts:
            getattr(self.student, part).requires_grad_(False)
        if config.frozen_parts:
            params = {id(p): p for p in self.student.parameters()}.values()
            trained = sum(p.numel() for p in params if p.requires_grad)
            total = sum(p.numel() for p in params)
            self.notes.append(f"frozen: {', '.join(config.frozen_parts)} ({trained:,} of "
                              f"{total:,} parameters train)")
        if config.lr_multipliers:
            self.notes.append("learning rate per part: " + ", ".join(
                f"{part} x{factor:g}" for part, factor in config.lr_multipliers.items()))

    def _check_teacher_vocab(self) -> None:
        student_vocab = int(self.student.lm_head.weight.shape[0])
        if self.teacher_vocab_map is not None:
            vmap = torch.as_tensor(self.teacher_vocab_map, dtype=torch.long)
            if vmap.dim() != 1 or vmap.numel() != student_vocab:
                raise ValueError(f"teacher_vocab_map must hold one teacher id per student id "
                                 f"({student_vocab}), got shape {list(vmap.shape)}")
            t_vocab = teacher_vocab_size(self.teacher)
            if int(vmap.min()) < 0 or int(vmap.max()) >= t_vocab:
                raise ValueError(f"teacher_vocab_map holds ids outside the teacher's "
                                 f"vocabulary [0, {t_vocab})")
            self.teacher_vocab_map = vmap.to(self.device)
            return
        t_vocab = teacher_vocab_size(self.teacher)
        if t_vocab < student_vocab:
            raise ValueError(f"the teacher's vocabulary ({t_vocab}) is smaller than the "
                             f"student's ({student_vocab}): the ids cannot mean the same "
                             "tokens; give a teacher_vocab_map")

    def _resolve_precision(self):
        p = self.config.precision
        if p in ("bf16", "fp16") and self.device.type != "cuda":
            raise ValueError(f"precision='{p}' needs a CUDA device (the CPU trains in fp32)")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(p)
        if p == "auto":
            dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.notes.append("precision: " + {None: "fp32", torch.bfloat16: "bf16 autocast",
                                            torch.float16: "fp16 autocast + grad scaler"}[dtype])
        return dtype

    @property
    def use_bf16(self) -> bool:
        return self.amp_dtype == torch.bfloat16

    def _autocast(self):
        if self.amp_dtype is not None:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    @property
    def pad_id(self) -> int:
        return self.student.config.pad_token_id

    # ------------------------------------------------------------------ one step
    def _next_micro_batches(self) -> list[dict]:
        micro = []
        for _ in range(self.config.grad_accum):
            try:
                batch = next(self.data)
            except StopIteration:
                raise RuntimeError("the data iterator ran out; pass an endless stream "
                                   "(fastencdec.data.BatchStream)") from None
            micro.append(_to_device(batch, self.device))
        cfg = self.config
        if cfg.task == "distill" and cfg.on_policy > 0:
            # one coin per step (from the checkpointed torch RNG): on-policy or data targets
            if float(torch.rand(())) < cfg.on_policy:
                micro = [sample_student_targets(self.student, b, max_new_tokens=cfg.max_new_tokens,
                                                temperature=cfg.sample_temperature)
                         for b in micro]
        return micro

    def train_step(self) -> dict:
        """One optimizer step; returns its record (step, loss, lr, grad_norm, tokens; for
        distillation also its KL and CE parts)."""
        cfg = self.config
        t0 = time.perf_counter()
        micro = self._next_micro_batches()
        counts = [int((b["labels"] != -100).sum()) for b in micro]
        total = float(all_reduce_sum(torch.tensor(float(sum(counts)), device=self.device)))
        scale = self.dist.world_size / max(total, 1.0)  # DDP averages over processes
        loss_sum = torch.zeros((), device=self.device)
        ce_sum = torch.zeros((), device=self.device)
        distill = cfg.task == "distill"
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with no_grad_sync(self.model, skip=not last), self._autocast():
                teacher = (teacher_targets(self.teacher, batch, self.pad_id,
                                           vocab_map=self.teacher_vocab_map)
                           if distill else None)
                if distill:
                    loss, n, ce = self._forward(batch, teacher, with_ce=True)
                    ce_sum += ce.float() * n
                else:
                    loss, n = self._forward(batch)
            weighted = loss.float() * (n * scale)
            (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            loss_sum += loss.detach().float() * n
        if self.scaler is not None:
            for opt in self.optimizer.optimizers:
                self.scaler.unscale_(opt)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                                             cfg.max_grad_norm))
        lr = self.base_lr()
        if self.scaler is not None:
            for opt in self.optimizer.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(int(b["attention_mask"].sum()) + c for b, c in zip(micro, counts, strict=True))
        tokens = int(all_reduce_sum(torch.tensor(tokens, device=self.device)))
        self.tokens_seen += tokens
        record = {"step": self.step, "loss": float(all_reduce_sum(loss_sum)) / max(total, 1.0),
                  "lr": lr, "target_tokens": int(total), "tokens": tokens,
                  "step_time_s": time.perf_counter() - t0}
        if distill:
            ce = float(all_reduce_sum(ce_sum)) / max(total, 1.0)
            record["ce"] = ce
            record["kl"] = ((record["loss"] - (1 - cfg.alpha) * ce)
                            / (cfg.alpha * cfg.temperature ** 2) if cfg.alpha > 0 else None)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.history.append(record)
        return record

    def base_lr(self) -> float:
        """The learning rate now, of the parts without an ``lr_multipliers`` factor."""
        groups = self.optimizer.param_groups
        for g in groups:
            if g.get("lr_factor", 1.0) == 1.0:
                return g["lr"]
        return groups[0]["lr"] / groups[0]["lr_factor"]

    # ------------------------------------------------------------------ the loop
    def _say(self, bar: ProgressBar | None, line: str) -> None:
        if self.dist.is_main and self.config.progress:
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)

    def _start(self, resume: str | None, force_resume: bool) -> None:
        cfg = self.config
        out = cfg.out_dir
        if out is not None and self.dist.is_main and resume is None:
            prepare_output_dir(out, resume=False, overwrite=cfg.overwrite, strict=False)
        barrier()
        resumed = False
        if resume is not None:
            resumed = self.resume(resume, force=force_resume)
            if not resumed:
                self.notes.append(f"no checkpoint to resume in {out}: starting at step 0")
        if self.checkpoints is not None and self.dist.is_main:
            self.checkpoints.clean_stale()
        if out is not None and self.dist.is_main:
            os.makedirs(out, exist_ok=True)
            self.metrics = MetricsLogger(os.path.join(out, "metrics.jsonl"), csv_dir=out,
                                         tensorboard_dir=os.path.join(out, "tensorboard"),
                                         resume_step=self.step)
        self._started = True

    def train(self, *, resume: str | None = None, steps: int | None = None,
              max_seconds: float | None = None, force_resume: bool = False) -> list[dict]:
        """Run until ``config.max_steps``; returns the step records.

        ``resume``: a checkpoint folder, or ``"auto"`` for the newest under
        ``out_dir`` (nothing to resume from is fine: training starts fresh). Without
        it, an ``out_dir`` that holds another run is refused unless
        ``config.overwrite``. ``force_resume``: accept a checkpoint whose
        configuration differs. ``steps`` / ``max_seconds``: stop earlier, after that
        many optimizer steps in this call or that much time (the schedule still spans
        ``max_steps``).

        On SIGINT/SIGTERM the current step finishes, a checkpoint is written (with
        ``out_dir``) and :class:`TrainingInterrupted` is raised.
        """
        cfg = self.config
        if not self._started:
            self._start(resume, force_resume)
        elif resume is not None:
            self.resume(resume, force=force_resume)
        start_step, t_start = self.step, time.perf_counter()
        tokens_start = self.tokens_seen
        stop = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        for note in self.notes:
            self._say(None, note)
        self.notes = []
        bar = ProgressBar(cfg.max_steps, initial=self.step, desc=cfg.task,
                          enabled=cfg.progress and self.dist.is_main)
        interval = IntervalMeans()
        last_logged = last_eval = None
        try:
            with StopOnSignal(announce=self.dist.is_main) as signals:
                while self.step < stop:
                    record = self.train_step()
                    interval.add(record, weight=max(record["target_tokens"], 1))
                    record["tokens_per_s"] = bar.update(1, loss=record["loss"],
                                                        tokens=record["tokens"])
                    record["elapsed_s"] = time.perf_counter() - t_start
                    interrupted = self._stop_requested(signals)
                    timed_out = max_seconds is not None and record["elapsed_s"] > max_seconds
                    if (self.step % cfg.log_every == 0 or self.step == stop or interrupted
                            or timed_out):
                        self._log_interval(record, interval, bar)
                        last_logged = self.step
                    if (self.evaluator is not None and cfg.eval_every
                            and self.step % cfg.eval_every == 0):
                        self._evaluate(bar)
                        last_eval = self.step
                    if (self.checkpoints is not None and cfg.save_every
                            and self.step % cfg.save_every == 0 and self.step < cfg.max_steps
                            and not interrupted):
                        self.save_checkpoint()
                    if interrupted:
                        saved = self.save_checkpoint() if self.checkpoints is not None else None
                        raise TrainingInterrupted(self.step, signals.signum or signal.SIGTERM,
                                                  saved)
                    if timed_out:
                        break
        finally:
            bar.close()
        if last_logged != self.step and self.step > start_step:
            self._log_interval(self.history[-1], interval, None)
        if (self.evaluator is not None and self.step > start_step and last_eval != self.step
                and self.step >= cfg.max_steps):
            self._evaluate(None)
        if self.checkpoints is not None and self.step > start_step:
            self.save_checkpoint()
        if self.step > start_step:
            self._summarise(time.perf_counter() - t_start, self.tokens_seen - tokens_start)
        return self.history

    def _stop_requested(self, signals: StopOnSignal) -> bool:
        flag = torch.tensor(1.0 if signals.requested else 0.0, device=self.device)
        requested = float(all_reduce_sum(flag)) > 0  # every rank stops at the same step
        if requested and signals.signum is None:
            signals.signum = signal.SIGTERM
        return requested

    def _log_interval(self, record: dict, interval: IntervalMeans, bar) -> None:
        means = interval.pop()
        row = {"step": record["step"], "loss": means.get("loss", record["loss"]),
               "lr": record["lr"]}
        if self.config.task == "distill":
            row["kl"] = means.get("kl")
            row["ce"] = means.get("ce")
        if self.config.max_grad_norm is not None:
            row["grad_norm"] = means.get("grad_norm")
        row.update(tokens_per_s=means["tokens_per_s"], tokens_seen=self.tokens_seen,
                   steps_in_interval=means["steps_in_interval"],
                   elapsed_s=record.get("elapsed_s"))
        self.metrics.log(row, split="train")
        self._say(bar, format_log_line(row, self.config.max_steps))

    def _evaluate(self, bar) -> dict:
        result = self.evaluator(unwrap_model(self.student))
        row = {"step": self.step, **result}
        self.eval_history.append(row)
        self.metrics.log(row, split="eval")
        metric = self.config.best_metric
        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.items()
                          if isinstance(v, float))
        self._say(bar, f"eval at step {self.step}: {shown}")
        if metric not in result:
            raise KeyError(f"best_metric {metric!r} is not among the evaluator's metrics "
                           f"{sorted(result)}")
        value, higher = float(result[metric]), EVAL_METRICS[metric]
        better = self.best is None or (value > self.best["value"] if higher
                                       else value < self.best["value"])
        if better:
            self.best = {"metric": metric, "value": value, "step": self.step}
            if self.config.out_dir is not None:
                self.save_model(os.path.join(self.config.out_dir, "best_model"))
                if self.dist.is_main:
                    with open(os.path.join(self.config.out_dir, "best.json"), "w",
                              encoding="utf-8") as fh:
                        json.dump({**self.best, "metrics": result}, fh, indent=1)
        return result

    def _summarise(self, seconds: float, tokens: int) -> None:
        train_rows = [r for r in self.metrics.records if r.get("split") == "train"]
        final_loss = train_rows[-1]["loss"] if train_rows else self.history[-1]["loss"]
        self.summary = {"steps": self.step, "wall_s": seconds,
                        "tokens_per_s": tokens / max(seconds, 1e-9),
                        "final_train_loss": final_loss,
                        "final_eval": self.eval_history[-1] if self.eval_history else None,
                        "best": self.best}
        line = (f"done: step {self.step}/{self.config.max_steps} in {seconds:.0f}s, "
                f"{self.summary['tokens_per_s']:,.0f} tokens/s; final train loss "
                f"{final_loss:.4f}")
        if self.eval_history:
            last = self.eval_history[-1]
            line += "; eval " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()
                                          if k != "step" and isinstance(v, float))
        if self.best is not None:
            line += f"; best {self.best['metric']} {self.best['value']:.4f} at step " \
                    f"{self.best['step']}"
        self._say(None, line)
        if self.config.out_dir is not None and self.dist.is_main:
            with open(os.path.join(self.config.out_dir, "summary.json"), "w",
                      encoding="utf-8") as fh:
                json.dump(self.summary, fh, indent=1, default=str)

    # ------------------------------------------------------------------ checkpoints
    def _fsdp(self) -> bool:
        return self.dist.enabled and self.config.distributed == "fsdp"

    def state_dict(self) -> dict:
        """Model, optimizer, schedule, data position and counters (no RNG: see save)."""
        fsdp = self._fsdp()
        state = {"model": full_model_state(self.loss_module, fsdp),
                 "optimizer": full_optimizer_state(self.loss_module, self.optimizer, fsdp),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "tokens_seen": self.tokens_seen, "config": self.config.to_dict(),
                 "world_size": self.dist.world_size,
                 "run": {"run_id": self.run_id, "config_hash": self.config_hash},
                 "best": self.best}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        load_full_state(self.loss_module, self.optimizer, state["model"], state["optimizer"],
                        self._fsdp())
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best = state.get("best")
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        if "data" in state:
            if not hasattr(self.data, "load_state_dict"):
                raise TypeError("the checkpoint holds a data position but the data iterator "
                                "has no load_state_dict (use fastencdec.data.BatchStream)")
            self.data.load_state_dict(state["data"])
        elif hasattr(self.data, "load_state_dict"):
            warnings.warn("the checkpoint holds no data position: data restarts from the "
                          "beginning", stacklevel=2)

    def save_checkpoint(self) -> str:
        if self.checkpoints is None:
            raise ValueError("save_checkpoint needs config.out_dir")
        state = self.state_dict()  # every rank: FSDP gathers collectively
        return self.checkpoints.save(self.step, state if self.dist.is_main else None,
                                     capture_rng_state(),
                                     extra={"tokens_seen": self.tokens_seen})

    def resume(self, path: str, *, force: bool = False) -> bool:
        """Load a checkpoint (``"auto"``: the newest in ``out_dir``); False if none.

        A checkpoint written with a different configuration is refused unless
        ``force``."""
        if path == "auto":
            if self.checkpoints is None:
                raise ValueError("resume='auto' needs config.out_dir")
            path = self.checkpoints.latest()
            if path is None:
                return False
        manifest = CheckpointManager.manifest(path) or {}
        theirs = manifest.get("config_hash")
        if theirs and theirs != self.config_hash:
            message = (f"checkpoint {path} was written by a run with a different configuration "
                       f"(config hash {theirs}, this run {self.config_hash}): training, model "
                       "or data settings changed")
            if not force:
                raise CheckpointError(message + "; resume with the same settings, start a new "
                                      "run (--overwrite or another output_dir), or pass "
                                      "--force-resume to load it anyway")
            warnings.warn(message + "; loading it anyway (--force-resume)", stacklevel=2)
        state, rng = CheckpointManager.load(path, rank=self.dist.rank)
        if int(state.get("world_size", 1)) != self.dist.world_size:
            warnings.warn(f"checkpoint written by {state.get('world_size')} processes, resumed "
                          f"with {self.dist.world_size}: data order and RNG will differ",
                          stacklevel=2)
        self.load_state_dict(state)
        restore_rng_state(rng)
        run_id = manifest.get("run_id") or state.get("run", {}).get("run_id")
        if run_id:
            self.run_id = run_id
            if self.checkpoints is not None:
                self.checkpoints.run_id = run_id
        self.notes.append(f"resumed from {path} at step {self.step}")
        return True

    def save_model(self, directory: str | os.PathLike) -> None:
        """``save_pretrained`` of the student (rank 0 writes; FSDP gathers first)."""
        student = unwrap_model(self.student)
        directory = os.fspath(directory)
        if self._fsdp():
            full = full_model_state(self.loss_module, True)
            full = {k.removeprefix("model."): v for k, v in full.items()}
            if self.dist.is_main:
                with on_meta():
                    copy = type(student)(student.config)
                if hasattr(copy, "load_weights"):
                    copy = copy.load_weights(full)
                else:  # a vision-language model: every tensor, then re-tie its LM head
                    result = copy.load_state_dict(full, strict=False, assign=True)
                    tied = {"lm.lm_head.weight"} if student.config.tie_embeddings else set()
                    missing = sorted(set(result.missing_keys) - tied)
                    if missing or result.unexpected_keys:
                        raise ValueError(f"the gathered state does not match the model: "
                                         f"missing {missing[:6]}, unexpected "
                                         f"{result.unexpected_keys[:6]}")
                    copy.lm.tie_weights()
                copy.save_pretrained(directory)
        elif self.dist.is_main:
            student.save_pretrained(directory)
        if self.dist.is_main:
            public_file_modes(directory)
        barrier()

    def close(self) -> None:
        self.metrics.close()
