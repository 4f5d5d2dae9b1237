"""An int8/bf16 model saved by ``save_inference``, read into the C++ kernels' packed
layouts with numpy alone.

The packing is the one ``Int8Linear``/``Bf16Linear`` do (``models/quantize.py``):
panels of 32 output columns, 4 (int8) or 2 (bf16) inputs per column, zero padded; the
q/k/v projections of each self-attention are stacked into one fused projection, as
``to_inference`` fuses them (per-channel scales carry over, so the results are the
same bitwise). A tied LM head is held once: token embeddings are read back from its
panels, dequantised (int8) or as stored (bf16), as ``PackedEmbedding`` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .safetensors_file import SafetensorsFile

FORMAT_KEY = "fastencdec_weight_format"  # safetensors metadata: the weight format
TIED_KEY = "fastencdec_tied"  # safetensors metadata: JSON {alias: stored name}
FORMATS = ("int8", "bf16")
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_GROUP = {"int8": 4, "bf16": 2}  # inputs per 32-column panel entry
_WEIGHT_DTYPE = {"int8": "I8", "bf16": "BF16"}
_BIAS_DTYPE = {"int8": "F32", "bf16": "BF16"}


def pack_panels(plain: np.ndarray, group: int) -> np.ndarray:
    """``W [N, K]`` -> panels ``[ceil(N/32), ceil(K/g), 32, g]`` with
    ``panels[p, q, c, r] = W[32 p + c, g q + r]`` (zero padded)."""
    n, k = plain.shape
    n_pad, k_pad = -(-n // 32) * 32, -(-k // group) * group
    if (n_pad, k_pad) != (n, k):
        padded = np.zeros((n_pad, k_pad), dtype=plain.dtype)
        padded[:n, :k] = plain
        plain = padded
    return np.ascontiguousarray(
        plain.reshape(n_pad // 32, 32, k_pad // group, group).transpose(0, 2, 1, 3))


@dataclass
class Linear:
    """A packed layer: ``args`` is the tuple the C++ classes take (int8: panels, scale,
    bias; bf16: panels, bias, out_features)."""

    fmt: str
    panels: np.ndarray
    scale: np.ndarray | None  # int8 only
    bias: np.ndarray | None
    in_features: int
    out_features: int

    @property
    def args(self) -> tuple:
        if self.fmt == "int8":
            return self.panels, self.scale, self.bias
        return self.panels, self.bias, self.out_features

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Weight rows ``W[ids]`` (int8: dequantised to fp32, as ``Int8Linear.rows``;
        bf16: the stored bits)."""
        picked = self.panels[ids // 32, :, ids % 32]  # [T, K / g, g]
        w = picked.reshape(len(ids), -1)[:, :self.in_features]
        if self.fmt == "int8":
            return w.astype(np.float32) * self.scale[ids, None]
        return np.ascontiguousarray(w)


class WeightReader:
    """Reads the named tensors of one file, each exactly once, checking dtypes and shapes
    against what the config says the model holds."""

    def __init__(self, f: SafetensorsFile, tied: dict[str, str], fmt: str):
        self.f, self.tied, self.fmt = f, tied, fmt
        self.used: set[str] = set()

    def stored(self, name: str) -> str | None:
        name = self.tied.get(name, name)
        return name if name in self.f.entries else None

    def check(self, name: str, dtype: str, shape: tuple[int, ...]) -> str:
        """The stored name of ``name``, which must hold ``dtype`` ``shape``."""
        stored = self.stored(name)
        if stored is None:
            raise ValueError(f"{self.f.path}: {name} is missing")
        e = self.f.entries[stored]
        if e.dtype != dtype or e.shape != tuple(shape):
            raise ValueError(f"{self.f.path}: {name} is {e.dtype} {list(e.shape)}, expected "
                             f"{dtype} {list(shape)} (config.json and the weights disagree)")
        return stored

    def read(self, name: str, dtype: str, shape: tuple[int, ...], out=None) -> np.ndarray:
        stored = self.check(name, dtype, shape)
        self.used.add(stored)
        return self.f.read(stored, out)

    def norm(self, name: str, dim: int) -> np.ndarray:
        return self.read(f"{name}.weight", "F32", (dim,))

    def linear(self, names: list[str], in_features: int, outs: list[int]) -> Linear:
        """The layers ``names`` (out features ``outs``) stacked into one packed layer."""
        fmt, n = self.fmt, sum(outs)
        for name, out in zip(names, outs, strict=True):  # before allocating what they claim
            self.check(f"{name}.weight", _WEIGHT_DTYPE[fmt], (out, in_features))
        plain = np.empty((n, in_features), dtype=np.int8 if fmt == "int8" else np.uint16)
        scale = np.empty(n, dtype=np.float32) if fmt == "int8" else None
        has_bias = {self.stored(f"{name}.bias") is not None for name in names}
        if len(has_bias) != 1:
            raise ValueError(f"{self.f.path}: {', '.join(names)}: all or none need a bias")
        bias = (np.empty(n, dtype=np.float32 if fmt == "int8" else np.uint16)
                if has_bias.pop() else None)
        row = 0
        for name, out in zip(names, outs, strict=True):
            self.read(f"{name}.weight", _WEIGHT_DTYPE[fmt], (out, in_features),
                      plain[row:row + out])
            if scale is not None:
                self.read(f"{name}.weight_scale", "F32", (out,), scale[row:row + out])
            if bias is not None:
                self.read(f"{name}.bias", _BIAS_DTYPE[fmt], (out,), bias[row:row + out])
            row += out
        if scale is not None and not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{self.f.path}: {names[0]}.weight_scale must be finite and > 0")
        return Linear(fmt, pack_panels(plain, _GROUP[fmt]), scale, bias, in_features, n)

    def unused(self) -> list[str]:
        return sorted(set(self.f.entries) - self.used)


def read_config(directory: Path):
    """(the config object of ``directory/config.json``, the model's class name)."""
    from ..models.config import MAX_CONFIG_FILE_BYTES, DecoderOnlyConfig, EncDecConfig

    path = directory / CONFIG_NAME
    try:
        if path.stat().st_size > MAX_CONFIG_FILE_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_FILE_BYTES} bytes")
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a readable config ({err})") from None
    arch = data.get("architecture") if isinstance(data, dict) else None
    classes = {c.architecture: c for c in (EncDecConfig, DecoderOnlyConfig)}
    if arch not in classes:
        raise ValueError(f"{path}: architecture must be one of {sorted(classes)}, got {arch!r}")
    return classes[arch].load(path)


def open_weights(directory: str | os.PathLike):
    """(config, weight format, SafetensorsFile, tied aliases) of a ``save_inference``
    directory; the caller closes the file."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (not a saved model?)")
    config = read_config(directory)
    f = SafetensorsFile(directory / WEIGHTS_NAME)
    try:
        fmt = f.metadata.get(FORMAT_KEY)
        if fmt not in FORMATS:
            what = "a float checkpoint" if fmt is None else f"{fmt!r} weights"
            raise ValueError(f"{f.path} holds {what}; the runtime serves int8 and bf16 models "
                             f"saved by fastencdec.models.save_inference (convert with "
                             f"to_inference(model, 'int8' | 'bf16') first)")
        try:
            tied = json.loads(f.metadata.get(TIED_KEY, "{}"))
        except ValueError:
            tied = None
        if not isinstance(tied, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
            raise ValueError(f"{f.path}: malformed {TIED_KEY!r} metadata")
        if config.mlp != "gelu":
            raise ValueError(f"{directory / CONFIG_NAME}: the runtime serves GELU MLPs, not "
                             f"mlp={config.mlp!r} (use the torch model)")
    except BaseException:
        f.close()
        raise
    return config, fmt, f, tied
