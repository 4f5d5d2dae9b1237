"""Training checkpoints written atomically, and the RNG states a resume needs.

Layout under ``root``::

    step_00000100/state.pt          model, optimizer, scheduler, data position, step, ...
    step_00000100/rng_rank{r}.pt    torch / cuda / python / numpy RNG states of rank r
    step_00000100/manifest.json     written last: run id, config hash, step, files
    latest                          the bare name of the newest complete checkpoint

A checkpoint is written into ``step_N.tmp/``; its ``manifest.json`` is written
last, then the folder is renamed into place and ``latest`` replaced (temp file +
rename). Only a folder named exactly ``step_<8 digits>`` holding a manifest counts as
a checkpoint, so a crash at any moment (mid-write, mid-prune) leaves the previous
checkpoint intact and ``latest`` pointing at a complete one. ``latest`` is only
followed when it names such a folder inside ``root``. Pruning removes only the
checkpoints of the current run (its run id), renaming each out of the way first.
Files are read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from ..argcheck import int_at_least, positive_int

__all__ = [
    "atomic_torch_save",
    "capture_rng_state",
    "restore_rng_state",
    "CheckpointManager",
    "CheckpointError",
    "CheckpointWriteError",
    "step_from_name",
]

STEP_NAME = re.compile(r"step_(\d{8})")
MANIFEST = "manifest.json"
TRASH_SUFFIX = ".del"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not belong to this run."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint file failed (full disk, permissions, ...): names the file."""


def step_from_name(name: str) -> int | None:
    """The step of a checkpoint folder name ``step_00000100``; None for any other name."""
    match = STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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


def _open_for_write(path: str):
    """Opened binary file for a checkpoint write (a seam for the full-disk test)."""
    return open(path, "wb")


def _write_error(path: str, exc: BaseException) -> CheckpointWriteError:
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    return CheckpointWriteError(f"could not write checkpoint file {path}: {reason} "
                                "(is the disk full?); the previous checkpoint is intact")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename.

    Any failure (e.g. a full disk) removes the temporary file and raises
    :class:`CheckpointWriteError` naming ``path``.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with _open_for_write(tmp) as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise _write_error(path, exc) from exc
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise _write_error(path, exc) from exc


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


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of checkpoint folder ``path``, or None when it has none (incomplete)."""
    file = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open(file, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


class CheckpointManager:
    """Save / find / load checkpoints under ``root``; keeps the ``keep_last`` newest of
    the run ``run_id`` (other runs' checkpoints are never pruned).

    With several processes pass ``rank``, ``world_size`` and a ``barrier`` callable
    (e.g. ``torch.distributed.barrier``); every rank calls :meth:`save`, rank 0
    writes the shared state, each rank its own RNG file.
    """

    STATE_FILE = "state.pt"
    LATEST = "latest"

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 2, rank: int = 0,
                 world_size: int = 1, barrier=None, run_id: str = "",
                 config_hash: str = ""):
        keep_last = positive_int("keep_last", keep_last)
        if world_size > 1 and barrier is None:
            raise ValueError("CheckpointManager with world_size > 1 needs a barrier callable")
        self.root = os.fspath(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier or (lambda: None)
        self.run_id = run_id
        self.config_hash = config_hash

    # ------------------------------------------------------------------ housekeeping
    def clean_stale(self) -> list[str]:
        """Remove what crashed saves and prunes leave behind (``step_N.tmp/``,
        ``step_N.del/``, temporary ``latest`` files); returns the names removed.
        Call on rank 0 before training starts."""
        removed = []
        if self.rank != 0 or not os.path.isdir(self.root):
            return removed
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            stale_dir = (name.endswith((".tmp", TRASH_SUFFIX)) and name.startswith("step_")
                         and os.path.isdir(path))
            stale_file = name.startswith(f"{self.LATEST}.tmp") and os.path.isfile(path)
            if stale_dir:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
            elif stale_file:
                os.remove(path)
                removed.append(name)
        return removed

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict | None, rng_state: dict | None = None, *,
             extra: dict | None = None) -> str:
        """Write checkpoint ``step``. ``state`` is used on rank 0 only (others may pass
        None); ``rng_state`` defaults to this process's :func:`capture_rng_state`;
        ``extra`` (plain JSON values) goes into the manifest."""
        step = int_at_least("step", step, 0)
        final = os.path.join(self.root, _step_dir_name(step))
        tmp = final + ".tmp"
        try:
            if self.rank == 0:
                os.makedirs(self.root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
                os.makedirs(tmp)
        except OSError as exc:
            raise _write_error(tmp, exc) from exc
        self.barrier()
        files = [f"rng_rank{r}.pt" for r in range(self.world_size)]
        try:
            atomic_torch_save(rng_state if rng_state is not None else capture_rng_state(),
                              os.path.join(tmp, f"rng_rank{self.rank}.pt"))
            if self.rank == 0:
                if state is None:
                    raise ValueError("rank 0 must pass the checkpoint state")
                atomic_torch_save(state, os.path.join(tmp, self.STATE_FILE))
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier()
        if self.rank == 0:
            manifest = {"step": step, "run_id": self.run_id, "config_hash": self.config_hash,
                        "world_size": self.world_size, "files": [self.STATE_FILE, *files],
                        **(extra or {})}
            try:
                # the manifest is written last: its presence marks a complete checkpoint
                _atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
                if os.path.exists(final):  # saving the same step again (e.g. after a resume)
                    self._remove(final)
                os.replace(tmp, final)
                _fsync_dir(self.root)
                _atomic_write_text(os.path.join(self.root, self.LATEST), _step_dir_name(step))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._prune()
        self.barrier()
        return final

    def _remove(self, path: str) -> None:
        # rename first: a kill mid-removal leaves a '.del' folder, never a half checkpoint
        trash = path + TRASH_SUFFIX
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        steps = self.list_steps(run_id=self.run_id)
        for step in steps[: max(len(steps) - self.keep_last, 0)]:
            self._remove(os.path.join(self.root, _step_dir_name(step)))

    # ------------------------------------------------------------------ find / load
    def list_steps(self, *, run_id: str | None = None) -> list[int]:
        """Steps of the complete checkpoints (all runs, or only ``run_id``'s)."""
        if not os.path.isdir(self.root):
            return []
        steps = []
        for name in os.listdir(self.root):
            step = step_from_name(name)
            if step is None:
                continue
            manifest = read_manifest(os.path.join(self.root, name))
            if manifest is None or manifest.get("step") != step:
                continue
            if run_id is not None and manifest.get("run_id") != run_id:
                continue
            steps.append(step)
        return sorted(steps)

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None. ``latest`` is followed only
        when it names a complete ``step_N`` folder directly inside ``root``; otherwise
        (missing, damaged, pointing elsewhere) the newest complete folder is used."""
        pointer = os.path.join(self.root, self.LATEST)
        if os.path.isfile(pointer):
            try:
                with open(pointer, encoding="utf-8") as fh:
                    name = fh.read(64).strip()
            except (OSError, UnicodeDecodeError):
                name = ""
            step = step_from_name(name)
            if step is not None and read_manifest(os.path.join(self.root, name)) is not None:
                return os.path.join(self.root, name)
            warnings.warn(f"{pointer} does not name a complete checkpoint in {self.root} "
                          f"({name[:40]!r}); using the newest complete one", stacklevel=2)
        steps = self.list_steps()
        return os.path.join(self.root, _step_dir_name(steps[-1])) if steps else None

    @staticmethod
    def load(path: str | os.PathLike, *, rank: int = 0, map_location="cpu") -> tuple[dict, dict]:
        """``(state, rng_state)`` of the checkpoint folder ``path`` for ``rank``."""
        path = os.fspath(path)
        state_file = os.path.join(path, CheckpointManager.STATE_FILE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"no checkpoint at {path} (missing {state_file})")
        if read_manifest(path) is None:
            raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST}: its save "
                                  "was interrupted, or it was written by an older version)")
        state = torch.load(state_file, map_location=map_location, weights_only=True)
        rng_file = os.path.join(path, f"rng_rank{rank}.pt")
        if not os.path.isfile(rng_file):
            raise FileNotFoundError(f"checkpoint {path} has no RNG state for rank {rank}: "
                                    "was it written with fewer processes?")
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        return state, rng

    @staticmethod
    def manifest(path: str | os.PathLike) -> dict | None:
        return read_manifest(path)
