"""The training loop: seq2seq fine-tuning, span-corruption pretraining, distillation.

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size``
processes. The loss of a step is the mean over all its real target tokens (every
micro-batch, every process), so 2 processes x 1 micro-batch and 1 process x 2
micro-batches make the same update.

Everything a resume needs is checkpointed (model, optimizer, schedule, RNG states
of every process, data position), so a resumed run reproduces the uninterrupted
one's losses exactly.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .activation_checkpointing import enable_activation_checkpointing
from .checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, barrier, no_grad_sync, unwrap_model, wrap_model
from .metrics import MetricsLogger, ProgressBar
from .objective import StudentLoss, sample_student_targets, teacher_logits_for
from .optim import build_optimizer
from .schedule import WarmupCosineSchedule

__all__ = ["Trainer"]


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
    return DistInfo(device=torch.device(device))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


class Trainer:
    """Train ``model`` (an ``EncoderDecoderLM`` or a ``DecoderOnlyLM``) on ``data``.

    ``data``: an iterator of collated batches (e.g. :class:`~fastencdec.data.BatchStream`;
    with ``state_dict``/``load_state_dict`` it resumes at the right batch).
    ``teacher``: for ``task="distill"``, a ``DecoderOnlyLM`` or a Hugging Face causal
    LM with the same tokenizer. ``dist_info``: from :func:`init_distributed` (default:
    the running process group, or one process on ``device``, CUDA when available).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, data, *,
                 teacher: nn.Module | None = None, dist_info: DistInfo | None = None,
                 device: str | torch.device | None = None):
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

        self.student = model.to(self.device)
        self.student.train()
        if config.activation_checkpointing:
            enable_activation_checkpointing(self.student)
        self.loss_module = StudentLoss(self.student, alpha=config.alpha,
                                       temperature=config.temperature,
                                       divergence=config.divergence)
        self.model = wrap_model(self.loss_module, config.distributed, self.dist)
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        # the optimizer sees the (possibly sharded) parameters
        self.optimizer = build_optimizer(self.student, lr=config.lr,
                                         weight_decay=config.weight_decay, betas=config.betas,
                                         use_muon=config.optimizer == "muon")
        self.scheduler = WarmupCosineSchedule(self.optimizer, warmup_steps=config.warmup_steps,
                                              total_steps=config.max_steps,
                                              min_ratio=config.min_lr_ratio)
        self.data = data
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict] = []
        self.use_bf16 = self._resolve_precision()
        out = config.out_dir
        self.checkpoints = None if out is None else CheckpointManager(
            os.path.join(out, "checkpoints"), keep_last=config.keep_last, rank=self.dist.rank,
            world_size=self.dist.world_size, barrier=barrier)
        self.metrics = MetricsLogger(os.path.join(out, "metrics.jsonl")
                                     if out is not None and self.dist.is_main else None)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _resolve_precision(self) -> bool:
        p = self.config.precision
        if p == "bf16" and self.device.type != "cuda":
            raise ValueError("precision='bf16' needs a CUDA device (the CPU trains in fp32)")
        return p == "bf16" or (p == "auto" and self.device.type == "cuda")

    def _autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
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
        """One optimizer step; returns its record (step, loss, lr, grad_norm, tokens)."""
        cfg = self.config
        t0 = time.perf_counter()
        micro = self._next_micro_batches()
        counts = [int((b["labels"] != -100).sum()) for b in micro]
        total = float(all_reduce_sum(torch.tensor(float(sum(counts)), device=self.device)))
        scale = self.dist.world_size / max(total, 1.0)  # DDP averages over processes
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with no_grad_sync(self.model, skip=not last), self._autocast():
                teacher_logits = (teacher_logits_for(self.teacher, batch, self.pad_id)
                                  if cfg.task == "distill" else None)
                loss, n = self.model(batch, teacher_logits)
            (loss.float() * (n * scale)).backward()
            loss_sum += loss.detach().float() * n
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                                             cfg.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
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
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ the loop
    def train(self, *, resume: str | None = None, steps: int | None = None,
              max_seconds: float | None = None) -> list[dict]:
        """Run until ``config.max_steps``; returns the step records.

        ``resume``: a checkpoint folder, or ``"auto"`` for the newest under
        ``out_dir`` (nothing to resume from is fine: training starts fresh).
        ``steps`` / ``max_seconds``: stop earlier, after that many optimizer steps in
        this call or that much time (the schedule still spans ``max_steps``).
        """
        cfg = self.config
        if resume is not None:
            self.resume(resume)
        start_step, t_start = self.step, time.perf_counter()
        stop = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        bar = ProgressBar(cfg.max_steps, initial=self.step, desc=cfg.task,
                          enabled=cfg.progress and self.dist.is_main)
        try:
            while self.step < stop:
                record = self.train_step()
                elapsed = time.perf_counter() - t_start
                record["tokens_per_s"] = bar.update(1, loss=record["loss"],
                                                    tokens=record["tokens"])
                record["elapsed_s"] = elapsed
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.metrics.log(record)
                if (self.checkpoints is not None and cfg.save_every
                        and self.step % cfg.save_every == 0 and self.step < cfg.max_steps):
                    self.save_checkpoint()
                if max_seconds is not None and elapsed > max_seconds:
                    break
        finally:
            bar.close()
        if self.checkpoints is not None and self.step > start_step:
            self.save_checkpoint()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def _fsdp(self) -> bool:
        return self.dist.enabled and self.config.distributed == "fsdp"

    def state_dict(self) -> dict:
        """Model, optimizer, schedule, data position and counters (no RNG: see save)."""
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.loss_module, options=opts)
            optim_state = get_optimizer_state_dict(self.loss_module, self.optimizer.optimizers,
                                                   options=opts)
        else:
            model_state = self.loss_module.state_dict()
            optim_state = self.optimizer.state_dict()
        state = {"model": model_state, "optimizer": optim_state,
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "tokens_seen": self.tokens_seen, "config": self.config.to_dict(),
                 "world_size": self.dist.world_size}
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.loss_module, state["model"], options=opts)
            set_optimizer_state_dict(self.loss_module, self.optimizer.optimizers,
                                     state["optimizer"], options=opts)
        else:
            self.loss_module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
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
                                     capture_rng_state())

    def resume(self, path: str) -> bool:
        """Load a checkpoint (``"auto"``: the newest in ``out_dir``); False if none."""
        if path == "auto":
            if self.checkpoints is None:
                raise ValueError("resume='auto' needs config.out_dir")
            path = self.checkpoints.latest()
            if path is None:
                return False
        state, rng = CheckpointManager.load(path, rank=self.dist.rank)
        if int(state.get("world_size", 1)) != self.dist.world_size:
            warnings.warn(f"checkpoint written by {state.get('world_size')} processes, resumed "
                          f"with {self.dist.world_size}: data order and RNG will differ",
                          stacklevel=2)
        self.load_state_dict(state)
        restore_rng_state(rng)
        return True

    def save_model(self, directory: str | os.PathLike) -> None:
        """``save_pretrained`` of the student (rank 0 writes; FSDP gathers first)."""
        student = unwrap_model(self.student)
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            full = get_model_state_dict(self.loss_module, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            full = {k.removeprefix("model."): v for k, v in full.items()}
            if self.dist.is_main:
                with torch.device("meta"):
                    copy = type(student)(student.config)
                copy.load_weights(full).save_pretrained(directory)
        elif self.dist.is_main:
            student.save_pretrained(directory)
        barrier()

    def close(self) -> None:
        self.metrics.close()
