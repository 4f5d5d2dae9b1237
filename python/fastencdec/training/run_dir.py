"""A run's output folder: refuse to mix two runs in one folder.

A new run needs an empty (or missing) ``output_dir``; a folder holding anything is
refused unless the run resumes (``resume``) or starts over (``overwrite``: the
artifacts a run writes are removed, any other file is left alone).
"""

from __future__ import annotations

import os
import shutil

__all__ = ["RUN_ARTIFACTS", "TRAINER_ARTIFACTS", "public_file_modes", "OutputDirError",
           "prepare_output_dir"]

# what the trainer writes into its output_dir
TRAINER_ARTIFACTS = ("checkpoints", "metrics.jsonl", "metrics.csv", "eval_metrics.csv",
                     "tensorboard", "best_model", "best.json", "summary.json")
# ... and what `fastencdec train` adds
RUN_ARTIFACTS = TRAINER_ARTIFACTS + ("model", "tokenizer.model", "tokenizer.json",
                                     "tokenizer_config.json", "bad_rows.txt")


class OutputDirError(ValueError):
    """``output_dir`` already holds another run."""


def prepare_output_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool,
                       strict: bool = True) -> None:
    """Check (and with ``overwrite`` clear) ``out_dir`` before a run starts.

    ``strict``: any entry makes the folder taken (the command line); otherwise only
    what the trainer writes (checkpoints, metrics) does (the Python API)."""
    out_dir = os.fspath(out_dir)
    artifacts = RUN_ARTIFACTS if strict else TRAINER_ARTIFACTS
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputDirError(f"output_dir {out_dir} exists and is not a folder")
    if resume and overwrite:
        raise OutputDirError("pass either --resume or --overwrite, not both")
    if not os.path.isdir(out_dir) or resume:
        return
    taken = os.listdir(out_dir) if strict else [
        n for n in os.listdir(out_dir) if n in artifacts]
    if not taken:
        return
    if overwrite:
        for name in artifacts:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        return
    listing = sorted(taken)
    shown = ", ".join(listing[:4]) + (", ..." if len(listing) > 4 else "")
    raise OutputDirError(f"output_dir {out_dir} is not empty ({shown}): resume the run in it "
                         "(--resume auto), start over there (--overwrite), or choose another "
                         "output_dir")


def public_file_modes(directory: str | os.PathLike) -> None:
    """Give the files in ``directory`` the mode a new file gets (``0666 & ~umask``):
    files written through temporary files may be private (0600), and a saved model
    should be as readable as anything else the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)
