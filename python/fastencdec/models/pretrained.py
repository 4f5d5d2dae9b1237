"""Checkpoints in the project's own format (DESIGN §6): ``model.safetensors`` + ``config.json``.

Nothing pickled is ever read. Tied weights are stored once (the LM head is
re-tied on load). Each file is written to a temporary name, flushed to disk and
renamed into place, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .backend import ops_backend

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` and small helpers shared by both models.

    A model class sets ``config_class`` and implements ``tie_weights()``.
    """

    config_class: type

    def tie_weights(self) -> None:  # pragma: no cover - every model overrides it
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def ops_backend(self, name: str | None):
        """Context manager forcing every op to ``name`` (see :mod:`.backend`)."""
        return ops_backend(name)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tied = {"lm_head.weight"} if self.config.tie_embeddings else set()
        tensors = {k: v.detach().contiguous()
                   for k, v in self.state_dict().items() if k not in tied}
        tmp = directory / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        _replace_atomically(tmp, directory / WEIGHTS_NAME)
        self.config.save(directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device=None, dtype=None):
        """Load a directory written by ``save_pretrained`` (weights keep their stored
        dtype unless ``dtype`` is given). The model is built on the ``meta`` device
        and the stored tensors are assigned, so nothing is initialised twice."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found (not a saved model?)")
        config = cls.config_class.load(directory / CONFIG_NAME)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(device or "cpu"))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        with torch.device("meta"):
            model = cls(config)
        return model.load_weights(state, source=str(directory))

    def load_weights(self, state: dict[str, torch.Tensor], *, source: str = "state dict"):
        """Assign ``state``'s tensors as this model's parameters (strict: every
        parameter present, no extras; a tied LM head may be absent) and re-tie."""
        result = nn.Module.load_state_dict(self, state, strict=False, assign=True)
        missing = [k for k in result.missing_keys
                   if not (k == "lm_head.weight" and self.config.tie_embeddings)]
        if missing or result.unexpected_keys:
            raise ValueError(f"{source} does not match the model: missing {missing[:8]}, "
                             f"unexpected {result.unexpected_keys[:8]}")
        self.tie_weights()
        return self.eval()
