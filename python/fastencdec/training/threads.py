"""How many CPU threads torch should use, and a warning when the machine is busy.

Small models do microseconds of work per op: a second OpenMP thread adds its
synchronisation, which on an oversubscribed machine costs milliseconds per op (a
1.4M-parameter step measured 15 s with 2 threads and 0.3 s with 1 on a loaded
2-core machine). So on the CPU models below :data:`SMALL_MODEL_PARAMS` default to
one thread; larger ones keep torch's default.
"""

from __future__ import annotations

import os
import sys

import torch

from ..argcheck import positive_int

__all__ = ["SMALL_MODEL_PARAMS", "available_cores", "choose_threads", "warn_if_oversubscribed"]

SMALL_MODEL_PARAMS = 20_000_000
_warned = False


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int | None, *, device: str | torch.device = "cpu",
                   params: int | None = None) -> tuple[int, str]:
    """Set torch's CPU thread count; returns ``(threads, why)`` for the log."""
    if requested is not None:
        requested = positive_int("--threads", requested)
        torch.set_num_threads(requested)
        return requested, "as asked (--threads)"
    if torch.device(device).type != "cpu":
        return torch.get_num_threads(), "torch's default (the model runs on the GPU)"
    if params is not None and params < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)
        return 1, (f"a small model ({params / 1e6:.1f}M parameters): one thread avoids "
                   "synchronisation costs; --threads N to change")
    return torch.get_num_threads(), "torch's default; --threads N to change"


def warn_if_oversubscribed(threads: int | None = None) -> str | None:
    """Print one warning line (stderr, once per process) when other work already keeps
    the cores busy; returns the message."""
    global _warned
    if _warned or not hasattr(os, "getloadavg"):
        return None
    threads = torch.get_num_threads() if threads is None else threads
    cores = available_cores()
    load = os.getloadavg()[0]
    if load + threads <= cores + 0.5:
        return None
    _warned = True
    message = (f"this machine looks busy (load average {load:.1f} on {cores} cores, and torch "
               f"uses {threads} thread{'s' if threads > 1 else ''}): expect slower, noisier "
               "timings" + ("; --threads 1 is steadier" if threads > 1 else ""))
    print(f"warning: {message}", file=sys.stderr, flush=True)
    return message
