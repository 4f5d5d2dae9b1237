"""Training feedback: metric logs (JSONL, CSV, TensorBoard), interval means, a progress bar.

A resumed run first drops the rows logged after the step it resumes from (they
will be logged again), so every log holds exactly one row per logged step.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time

__all__ = ["MetricsLogger", "ProgressBar", "IntervalMeans", "read_metrics", "format_log_line"]


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _rewrite(path: str, lines: list[str]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def _truncate_jsonl(path: str, last_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    _rewrite(path, keep)


def _truncate_csv(path: str, last_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or "step" not in rows[0]:
        os.remove(path)
        return
    col = rows[0].index("step")
    keep = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0])
                        and r[col].isdigit() and int(r[col]) <= last_step]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(keep)
    os.replace(tmp, path)


class MetricsLogger:
    """Appends one JSON object per line to ``path`` (flushed each time, so a crash loses
    nothing already logged); ``path=None`` keeps records in memory only.

    ``csv_dir``: also one CSV file per split (``metrics.csv`` for ``train`` rows,
    ``eval_metrics.csv`` for ``eval`` rows; columns fixed by the first row).
    ``tensorboard_dir``: also TensorBoard scalars when ``tensorboard`` is installed.
    ``resume_step``: drop rows with a larger step from existing files first.
    """

    CSV_NAMES = {"train": "metrics.csv", "eval": "eval_metrics.csv"}

    def __init__(self, path: str | os.PathLike | None, *, append: bool = True,
                 csv_dir: str | os.PathLike | None = None,
                 tensorboard_dir: str | os.PathLike | None = None,
                 resume_step: int | None = None):
        self.path = None if path is None else os.fspath(path)
        self.records: list[dict] = []
        self._fh = None
        self._csv: dict[str, tuple] = {}
        self.csv_dir = None if csv_dir is None else os.fspath(csv_dir)
        self.tensorboard = None
        if self.path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if append and resume_step is not None:
                _truncate_jsonl(self.path, resume_step)
            self._fh = open(self.path, "a" if append else "w", encoding="utf-8")
        if self.csv_dir is not None:
            os.makedirs(self.csv_dir, exist_ok=True)
            for name in self.CSV_NAMES.values():
                file = os.path.join(self.csv_dir, name)
                if not append and os.path.isfile(file):
                    os.remove(file)
                elif resume_step is not None:
                    _truncate_csv(file, resume_step)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = None if resume_step is None else resume_step + 1
                self.tensorboard = SummaryWriter(os.fspath(tensorboard_dir), purge_step=purge)

    def log(self, record: dict, split: str | None = None) -> dict:
        record = {k: _plain(v) for k, v in record.items()}
        if split is not None:
            record = {"split": split, **record}
        self.records.append(record)
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        if self.csv_dir is not None and split in self.CSV_NAMES:
            self._write_csv(split, record)
        if self.tensorboard is not None and isinstance(record.get("step"), int):
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{split or 'train'}/{key}", value,
                                                record["step"])
        return record

    def _write_csv(self, split: str, record: dict) -> None:
        if split not in self._csv:
            file = os.path.join(self.csv_dir, self.CSV_NAMES[split])
            columns = None
            if os.path.isfile(file) and os.path.getsize(file) > 0:
                with open(file, encoding="utf-8", newline="") as fh:
                    columns = next(csv.reader(fh), None)
            fh = open(file, "a", encoding="utf-8", newline="")
            writer = csv.writer(fh)
            if not columns:
                columns = [k for k in record if k != "split"]
                writer.writerow(columns)
            self._csv[split] = (fh, writer, columns)
        fh, writer, columns = self._csv[split]
        writer.writerow(["" if record.get(c) is None else record.get(c) for c in columns])
        fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for fh, _, _ in self._csv.values():
            fh.close()
        self._csv = {}
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class IntervalMeans:
    """Means over the steps since the last :meth:`pop`: token-weighted for losses,
    per step for the rest, and tokens/s over the interval's wall time."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._weighted: dict[str, float] = {}
        self._plain: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._weight = 0.0
        self._tokens = 0
        self._steps = 0
        self._t0 = time.perf_counter()

    def add(self, record: dict, *, weight: float, weighted=("loss", "kl", "ce"),
            plain=("grad_norm", "step_time_s")) -> None:
        self._steps += 1
        self._weight += weight
        self._tokens += int(record.get("tokens", 0))
        for key in weighted:
            if record.get(key) is not None:
                self._weighted[key] = self._weighted.get(key, 0.0) + record[key] * weight
        for key in plain:
            if record.get(key) is not None:
                self._plain[key] = self._plain.get(key, 0.0) + record[key]
                self._counts[key] = self._counts.get(key, 0) + 1

    def pop(self) -> dict:
        out = {k: v / max(self._weight, 1e-12) for k, v in self._weighted.items()}
        out.update({k: v / self._counts[k] for k, v in self._plain.items()})
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        out["steps_in_interval"] = self._steps
        out["tokens_per_s"] = self._tokens / elapsed
        self.reset()
        return out


def format_log_line(record: dict, max_steps: int) -> str:
    """``step 100/1000  loss 1.2345 (kl 0.51 ce 0.73)  lr 3.0e-03  grad-norm 0.91  12,345 tok/s``"""
    parts = [f"step {record['step']}/{max_steps}", f"loss {record['loss']:.4f}"]
    if record.get("kl") is not None and record.get("ce") is not None:
        parts[-1] += f" (kl {record['kl']:.4f} ce {record['ce']:.4f})"
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("grad_norm") is not None:
        parts.append(f"grad-norm {record['grad_norm']:.3f}")
    parts.append(f"{record.get('tokens_per_s', 0.0):,.0f} tok/s")
    return "  ".join(parts)


class ProgressBar:
    """tqdm bar showing loss and tokens/s; silent when ``enabled`` is False
    (other ranks) or tqdm is missing. :meth:`write` prints a line above the bar."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train",
                 enabled: bool = True):
        self._bar = None
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._tokens = 0
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                                 leave=False)

    def update(self, steps: int = 1, *, loss: float | None = None, tokens: int = 0) -> float:
        """Advance; returns tokens/s since the bar started."""
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps = self._tokens / elapsed
        if self._bar is not None:
            postfix = {"tok/s": f"{tps:,.0f}"}
            if loss is not None:
                postfix = {"loss": f"{loss:.4f}", **postfix}
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(steps)
        return tps

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
