"""Training feedback: a JSONL metrics log and a progress bar with loss and tokens/s."""

from __future__ import annotations

import json
import math
import os
import time

__all__ = ["MetricsLogger", "ProgressBar", "read_metrics"]


class MetricsLogger:
    """Appends one JSON object per line to ``path`` (flushed each time, so a crash
    loses nothing already logged). ``path=None`` keeps records in memory only."""

    def __init__(self, path: str | os.PathLike | None, *, append: bool = True):
        self.path = None if path is None else os.fspath(path)
        self.records: list[dict] = []
        self._fh = None
        if self.path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._fh = open(self.path, "a" if append else "w", encoding="utf-8")

    def log(self, record: dict) -> None:
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class ProgressBar:
    """tqdm bar showing loss and tokens/s; silent when ``enabled`` is False
    (other ranks) or tqdm is missing."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train",
                 enabled: bool = True):
        self._bar = None
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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
