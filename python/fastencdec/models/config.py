"""Model configurations (DESIGN §1): dataclasses with a JSON round-trip and presets.

``EncDecConfig`` describes an :class:`EncoderDecoderLM`, ``DecoderOnlyConfig`` a
:class:`DecoderOnlyLM`. Both share every width; only the layer counts differ.
``num_parameters()`` counts parameters analytically (no tensors are built), so a
330M-parameter configuration can be sized and checked anywhere.

A configuration cannot hold a value of the wrong type or range: every field is
checked at construction (and again by ``replace``). ints are ints (not bools, not
``12.0``, not ``"12"``), floats are finite numbers, bools are bools (``"false"`` is
refused, not read as truthy). ``from_dict``/``load`` are the inverse of
``to_dict``/``save``: every field and the ``architecture`` must be present, so an
empty or partial ``config.json`` is refused instead of being completed with
mu-330m's defaults (build partial configs with ``preset(name).replace(...)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

MLP_KINDS = ("gelu", "swiglu")
# Every int field (widths, counts, ids, context length) must fit the int32 indices the
# kernels use; anything larger is a corrupted or hostile config, not a model.
MAX_INT = 2**31 - 1
# A config.json is a few hundred bytes; refusing huge files bounds the work of a load.
MAX_CONFIG_FILE_BYTES = 1 << 20


def _check_type(name: str, kind: str, value) -> Any:
    """``value`` as field ``name`` of annotation ``kind``, or a ValueError naming it."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool (true/false), got {value!r} "
                             f"({type(value).__name__})")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        value = int(value)
        if abs(value) > MAX_INT:
            raise ValueError(f"{name} must be at most {MAX_INT} in magnitude, got {value}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"config field {name} has an unsupported annotation {kind!r}")


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"field {key!r} appears twice")
        seen[key] = value
    return seen


@dataclass
class _CommonConfig:
    """Fields shared by both architectures (defaults: the ``mu-330m`` widths)."""

    vocab_size: int = 32128
    d_model: int = 1024
    n_heads: int = 6
    n_kv_heads: int = 3
    head_dim: int = 64  # attention width n_heads * head_dim may differ from d_model
    d_ff: int = 4096
    mlp: str = "gelu"  # "gelu": GELU(tanh) with biases | "swiglu": SwiGLU without biases
    attn_bias: bool = True
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # > 1: dynamic NTK scaling beyond max_position_embeddings
    max_position_embeddings: int = 1024
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 32000
    dropout: float = 0.0
    tie_embeddings: bool = True

    architecture: ClassVar[str] = ""
    _layer_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        # Types first (and normalise: 10000 -> 10000.0, numpy ints -> int), then ranges.
        for f in dataclasses.fields(self):
            kind = getattr(f.type, "__name__", f.type)  # the annotation (a string here)
            setattr(self, f.name, _check_type(f.name, kind, getattr(self, f.name)))
        positive = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                    "max_position_embeddings") + self._layer_fields
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.rope_scaling_factor >= 1.0:
            raise ValueError(f"rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        if self.rope_scaling_factor > 1.0 and self.head_dim <= 2:
            # The NTK base exponent is head_dim / (head_dim - 2).
            raise ValueError(f"rope_scaling_factor > 1 (dynamic NTK) needs head_dim > 2, "
                             f"got head_dim={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name} must lie in [0, vocab_size={self.vocab_size}), got {value}")

    # -- JSON round-trip ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The inverse of :meth:`to_dict`: ``architecture`` and every field required."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model config must be a JSON object / dict of "
                             f"{cls.__name__} fields, got {type(data).__name__}")
        data = dict(data)
        if "architecture" not in data:
            raise ValueError(f"config has no 'architecture' field (expected "
                             f"{cls.architecture!r}); a saved config names every field")
        arch = data.pop("architecture")
        if arch != cls.architecture:
            raise ValueError(f"config describes a {arch!r} model, not {cls.architecture!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields), key=str)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        missing = [name for name in fields if name not in data]
        if missing:
            raise ValueError(f"config lacks the fields {missing}; a saved config names every "
                             f"field (none is filled in from a preset)")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (JSON) atomically: a temporary file renamed into place."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a file written by :meth:`save`; every error names ``path``."""
        path = Path(path)
        size = path.stat().st_size  # FileNotFoundError names the path
        if size > MAX_CONFIG_FILE_BYTES:
            raise ValueError(f"{path}: {size} bytes is too large for a model config "
                             f"(at most {MAX_CONFIG_FILE_BYTES})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from err
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from err
        except RecursionError as err:
            raise ValueError(f"{path}: invalid JSON: nested too deeply") from err
        except ValueError as err:  # a duplicate key
            raise ValueError(f"{path}: {err}") from err
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} fields: {unknown}")
        return dataclasses.replace(self, **changes)

    # -- analytic parameter counts -------------------------------------------------------
    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def attention_params(self) -> int:
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        weights = self.d_model * (q_width + 2 * kv_width) + q_width * self.d_model
        biases = q_width + 2 * kv_width + self.d_model if self.attn_bias else 0
        return weights + biases

    def mlp_params(self) -> int:
        if self.mlp == "gelu":
            return 2 * self.d_model * self.d_ff + self.d_ff + self.d_model
        return 3 * self.d_model * self.d_ff

    def self_attention_layer_params(self) -> int:
        """An encoder layer or a decoder-only layer: self-attention + MLP + 2 norms."""
        return self.attention_params() + self.mlp_params() + 2 * self.d_model

    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)


@dataclass
class EncDecConfig(_CommonConfig):
    """An encoder-decoder LM (DESIGN §1). Defaults are the ``mu-330m`` preset."""

    n_encoder_layers: int = 20
    n_decoder_layers: int = 10

    architecture: ClassVar[str] = "encoder_decoder"
    _layer_fields: ClassVar[tuple[str, ...]] = ("n_encoder_layers", "n_decoder_layers")

    def decoder_layer_params(self) -> int:
        """Causal self-attention + cross-attention + MLP + 3 norms."""
        return 2 * self.attention_params() + self.mlp_params() + 3 * self.d_model

    def encoder_params(self) -> int:
        return self.n_encoder_layers * self.self_attention_layer_params()

    def decoder_params(self) -> int:
        return self.n_decoder_layers * self.decoder_layer_params()

    def num_parameters(self) -> int:
        final_norms = 2 * self.d_model
        return self.embedding_params() + self.encoder_params() + self.decoder_params() + final_norms

    @classmethod
    def preset(cls, name: str) -> EncDecConfig:
        if name not in ENCDEC_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(ENCDEC_PRESETS)}")
        return cls(**ENCDEC_PRESETS[name])


@dataclass
class DecoderOnlyConfig(_CommonConfig):
    """A decoder-only LM with the same blocks minus cross-attention (the paper's baseline)."""

    n_layers: int = 31
    max_position_embeddings: int = 2048  # holds input + output in one sequence

    architecture: ClassVar[str] = "decoder_only"
    _layer_fields: ClassVar[tuple[str, ...]] = ("n_layers",)

    def num_parameters(self) -> int:
        return (self.embedding_params() + self.n_layers * self.self_attention_layer_params()
                + self.d_model)

    @classmethod
    def twin_of(cls, config: EncDecConfig) -> DecoderOnlyConfig:
        """The decoder-only model with ``config``'s widths and, as nearly as whole layers
        allow, its parameter count (not checked: a tiny model's layers are coarse); its
        context holds the input and the output, so ``max_position_embeddings`` doubles."""
        from .sizing import size_decoder_only_to

        return size_decoder_only_to(config, tolerance=None)

    @classmethod
    def preset(cls, name: str) -> DecoderOnlyConfig:
        """The decoder-only twin of the encoder-decoder preset ``name``."""
        return cls.twin_of(EncDecConfig.preset(name))


ENCDEC_PRESETS: dict[str, dict[str, Any]] = {
    # The public reference checkpoint (DESIGN §1): 332,042,240 parameters.
    "mu-330m": dict(
        vocab_size=32128, d_model=1024, n_encoder_layers=20, n_decoder_layers=10,
        n_heads=6, n_kv_heads=3, head_dim=64, d_ff=4096, mlp="gelu", attn_bias=True,
        rope_theta=10000.0, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=32000, dropout=0.1, tie_embeddings=True,
    ),
    # For tests and demos: attention width 128 != d_model 64 on purpose; head_dim 32
    # is the smallest size every kernel promises (DESIGN §2).
    "tiny": dict(
        vocab_size=512, d_model=64, n_encoder_layers=2, n_decoder_layers=1,
        n_heads=4, n_kv_heads=2, head_dim=32, d_ff=128, mlp="gelu", attn_bias=True,
        rope_theta=10000.0, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0, tie_embeddings=True,
    ),
}

__all__ = ["EncDecConfig", "DecoderOnlyConfig", "ENCDEC_PRESETS", "MLP_KINDS", "MAX_INT"]
