"""Training checkpoints written atomically, and the RNG states a resume needs.

Layout under ``root``::

    step_00000100/state.pt          model, optimizer, scheduler, data position, step, ...
    step_00000100/rng_rank{r}.pt    torch / cuda / python / numpy RNG states of rank r
    latest                          the name of the newest complete checkpoint

A checkpoint is written into ``step_N.tmp/`` and renamed into place, then
``latest`` is replaced (temp file + rename): a crash at any moment leaves the
previous checkpoint intact and ``latest`` pointing at a complete one.
Files are read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

__all__ = [
    "atomic_torch_save",
    "capture_rng_state",
    "restore_rng_state",
    "CheckpointManager",
]


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict:
    """torch (CPU), every CUDA device, Python ``random`` and NumPy's global RNG."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's tuple holds an ndarray: store plain values (weights_only loading)
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different machine: at least restore this process's device
            torch.cuda.set_rng_state(cuda_states[min(torch.cuda.current_device(),
                                                     len(cuda_states) - 1)])


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Save / find / load checkpoints under ``root``; keeps the ``keep_last`` newest.

    With several processes pass ``rank``, ``world_size`` and a ``barrier`` callable
    (e.g. ``torch.distributed.barrier``); every rank calls :meth:`save`, rank 0
    writes the shared state, each rank its own RNG file.
    """

    STATE_FILE = "state.pt"
    LATEST = "latest"

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 2, rank: int = 0,
                 world_size: int = 1, barrier=None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if world_size > 1 and barrier is None:
            raise ValueError("CheckpointManager with world_size > 1 needs a barrier callable")
        self.root = os.fspath(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier or (lambda: None)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict | None, rng_state: dict | None = None) -> str:
        """Write checkpoint ``step``. ``state`` is used on rank 0 only (others may pass
        None); ``rng_state`` defaults to this process's :func:`capture_rng_state`."""
        final = os.path.join(self.root, _step_dir_name(step))
        tmp = final + ".tmp"
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            os.makedirs(tmp)
        self.barrier()
        atomic_torch_save(rng_state if rng_state is not None else capture_rng_state(),
                          os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        if self.rank == 0:
            if state is None:
                raise ValueError("rank 0 must pass the checkpoint state")
            atomic_torch_save(state, os.path.join(tmp, self.STATE_FILE))
        self.barrier()
        if self.rank == 0:
            if os.path.exists(final):  # saving the same step again (e.g. after a resume)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _atomic_write_text(os.path.join(self.root, self.LATEST), _step_dir_name(step))
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        steps = self.list_steps()
        for step in steps[: max(len(steps) - self.keep_last, 0)]:
            shutil.rmtree(os.path.join(self.root, _step_dir_name(step)), ignore_errors=True)

    # ------------------------------------------------------------------ find / load
    def list_steps(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        steps = []
        for name in os.listdir(self.root):
            if name.startswith("step_") and not name.endswith(".tmp") and os.path.isfile(
                    os.path.join(self.root, name, self.STATE_FILE)):
                steps.append(int(name[len("step_"):]))
        return sorted(steps)

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None."""
        pointer = os.path.join(self.root, self.LATEST)
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as fh:
                path = os.path.join(self.root, fh.read().strip())
            if os.path.isfile(os.path.join(path, self.STATE_FILE)):
                return path
        steps = self.list_steps()
        return os.path.join(self.root, _step_dir_name(steps[-1])) if steps else None

    @staticmethod
    def load(path: str | os.PathLike, *, rank: int = 0, map_location="cpu") -> tuple[dict, dict]:
        """``(state, rng_state)`` of the checkpoint folder ``path`` for ``rank``."""
        path = os.fspath(path)
        state_file = os.path.join(path, CheckpointManager.STATE_FILE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"no checkpoint at {path} (missing {state_file})")
        state = torch.load(state_file, map_location=map_location, weights_only=True)
        rng_file = os.path.join(path, f"rng_rank{rank}.pt")
        if not os.path.isfile(rng_file):
            raise FileNotFoundError(f"checkpoint {path} has no RNG state for rank {rank}: "
                                    "was it written with fewer processes?")
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        return state, rng
