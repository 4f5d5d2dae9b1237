"""Checkpoints in the project's own format (DESIGN §6): ``model.safetensors`` + ``config.json``.

Nothing pickled is ever read. Tied weights are stored once (the LM head is
re-tied on load). Each file is written to a temporary name, flushed to disk and
renamed into place, so a crash mid-write leaves the previous file intact.

Loading cannot be silently wrong: before any module is built or any tensor read,
the config is checked against the safetensors header (names, shapes, dtypes), so
a config whose layer counts or widths do not match the file fails at once naming
the field or tensor, whatever size it claims. A stored LM head is never thrown
away: a config that says tied while the file holds a different head is refused.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .backend import ops_backend
from .meta_init import on_meta

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# safetensors dtype names a model's weights may have.
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _new_file_mode() -> int:
    """The mode a new file gets here (``0666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace_atomically(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``final`` with the usual mode for a new
    file (safetensors writes its file private, 0600)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, _new_file_mode())
    os.replace(tmp, final)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file's header (no tensor data read)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                    for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def _stored_weight_format(path: Path) -> str | None:
    """The inference format a file was saved in by ``save_inference``, or None."""
    from .quantize import FORMAT_KEY

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get(FORMAT_KEY)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def _layer_lists(model: nn.Module, config) -> dict[str, str]:
    """``{ModuleList name: config field}`` for a model built with layer field ``j`` set
    to ``j + 1`` layers (so each list's length names its field)."""
    fields = type(config)._layer_fields
    lists = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList) and 1 <= len(child) <= len(fields):
            lists[name] = fields[len(child) - 1]
    if sorted(lists.values()) != sorted(fields):
        raise RuntimeError(f"{type(model).__name__}: cannot match its layer lists to {fields}")
    return lists


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_weights_header(model_cls, config, header: dict[str, tuple[str, tuple[int, ...]]],
                         weights: str, config_name: str = CONFIG_NAME) -> None:
    """Check ``header`` (see :func:`read_safetensors_header`) against what ``model_cls(config)``
    holds, without building it: a model with one or two layers per stack is built on
    the ``meta`` device for the per-layer names and shapes, so the work is bounded by
    the file's header, never by the layer counts ``config`` claims."""
    # A size cap before anything is built: with one or two layers per stack the config
    # may not claim (much) more parameters than the file holds values, which bounds the
    # widths; the layer counts are then compared with the file's layer names.
    held = sum(math.prod(shape) for _, shape in header.values())
    small_config = config.replace(**{f: j + 1 for j, f in enumerate(config._layer_fields)})
    if small_config.num_parameters() > 2 * held + 1_000_000:
        raise ValueError(
            f"{config_name} describes layers and embeddings far larger than {weights} holds "
            f"({small_config.num_parameters():,} parameters with one or two layers per "
            f"stack, against {held:,} stored values; d_model={config.d_model}, d_ff={config.d_ff}, "
            f"vocab_size={config.vocab_size}, n_heads={config.n_heads}, "
            f"head_dim={config.head_dim})")
    with on_meta():
        small = model_cls(small_config)
    lists = _layer_lists(small, config)
    params = small.state_dict(keep_vars=True)
    first_name = {}  # a tied parameter's first name: lm_head.weight -> embed.weight
    for name, p in params.items():
        first_name.setdefault(id(p), name)
    aliases = {name for name, p in params.items() if first_name[id(p)] != name}

    layer_key = re.compile(r"(\w+)\.(\d+)\.(.+)")
    top, per_layer = {}, {lst: {} for lst in lists}
    for name, p in params.items():
        m = layer_key.fullmatch(name)
        if m and m.group(1) in lists:
            if m.group(2) == "0":
                per_layer[m.group(1)][m.group(3)] = (tuple(p.shape), p.is_floating_point())
        else:
            top[name] = (tuple(p.shape), p.is_floating_point())

    # Layer counts first: a config claiming 20,000 layers fails here, in microseconds.
    held = {lst: set() for lst in lists}
    for name in header:
        m = layer_key.fullmatch(name)
        if m and m.group(1) in lists:
            held[m.group(1)].add(int(m.group(2)))
    for lst, field in lists.items():
        want = getattr(config, field)
        indices = sorted(held[lst])
        gap = next((i for i, index in enumerate(indices) if index != i), None)
        if len(indices) != want or gap is not None:
            detail = "" if gap is None else f" (numbered with a gap: layer {gap} is absent)"
            raise ValueError(f"{config_name} says {field}={want} but {weights} holds "
                             f"{len(indices)} of them ({lst}.*){detail}")

    expected = dict(top)
    for lst, names in per_layer.items():
        for i in range(getattr(config, lists[lst])):
            expected.update({f"{lst}.{i}.{rest}": shape for rest, shape in names.items()})
    extra = [name for name in header if name not in expected]
    if extra:
        raise ValueError(f"{weights} holds tensors that the {model_cls.__name__} described by "
                         f"{config_name} does not have: {extra[:8]}")
    for name, (want_shape, floating) in expected.items():  # model order: embed.weight first
        if name not in header:
            continue
        dtype, shape = header[name]
        if floating and dtype not in FLOAT_DTYPES:
            raise ValueError(f"{weights}: tensor {name!r} has dtype {dtype}; expected one of "
                             f"{sorted(FLOAT_DTYPES)}")
        if shape != want_shape:
            raise ValueError(f"{weights}: tensor {name!r} has shape {_shape(shape)} but "
                             f"{config_name} implies {_shape(want_shape)}")
    missing = [name for name in expected if name not in header and name not in aliases]
    if missing:
        hint = ""
        if "lm_head.weight" in missing and not config.tie_embeddings:
            hint = f" ({config_name} says tie_embeddings=false, so the LM head must be stored)"
        raise ValueError(f"{weights} lacks the tensors {missing[:8]}{hint}")


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

    def to_inference(self, dtype: str = "int8"):
        """Convert in place for CPU inference: ``"int8"`` (per-channel int8 weights, the LM
        head included), ``"bf16"`` or ``"fp32"``; see :mod:`fastencdec.models.quantize`."""
        from .quantize import to_inference

        return to_inference(self, dtype)

    def save_inference(self, directory: str | os.PathLike) -> None:
        """Save a model converted by :meth:`to_inference` (its format in the file)."""
        from .quantize import save_inference

        save_inference(self, directory)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from .quantize import weight_format

        if weight_format(self) in ("int8", "bf16"):
            raise ValueError(f"this model was converted with to_inference "
                             f"({weight_format(self)}): save it with save_inference(directory)")
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
        dtype unless ``dtype``, a floating torch dtype, is given). The config is checked
        against the weights' header first; then the model is built on the ``meta``
        device and the stored tensors are assigned, so nothing is initialised twice."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found (not a saved model?)")
        config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        config = cls.config_class.load(config_path)
        stored_format = _stored_weight_format(weights)
        if stored_format in ("int8", "bf16"):
            raise ValueError(f"{weights} holds {stored_format} inference weights: load it with "
                             "fastencdec.models.quantize.load_inference(directory)")
        check_weights_header(cls, config, read_safetensors_header(weights), str(weights),
                             str(config_path))
        try:
            state = load_file(str(weights), device=str(device or "cpu"))
        except SafetensorError as err:
            raise ValueError(f"{weights}: cannot read the tensors ({err})") from err
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        with on_meta():
            model = cls(config)
        return model.load_weights(state, source=str(weights))

    def load_weights(self, state: dict[str, torch.Tensor], *, source: str = "state dict"):
        """Assign ``state``'s tensors as this model's parameters and re-tie.

        Strict: every parameter present with its shape, floating point, no extras. A
        tied parameter's second name (the LM head of a tied model) may be absent; if
        present it must equal the first, or the load is refused rather than dropping it.
        """
        params = self.state_dict(keep_vars=True)
        first_name = {}
        for name, p in params.items():
            first_name.setdefault(id(p), name)
        state = dict(state)
        for name, tensor in list(state.items()):
            if name not in params:
                continue
            if not isinstance(tensor, torch.Tensor) or (
                    params[name].is_floating_point() and not tensor.is_floating_point()):
                raise ValueError(f"{source}: {name!r} must be a floating-point tensor, got "
                                 f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{source}: tensor {name!r} has shape {_shape(tensor.shape)}, "
                                 f"the model expects {_shape(params[name].shape)}")
            original = first_name[id(params[name])]
            if original != name:  # a tied alias: keep one copy, but never a different one
                if original in state and not torch.equal(tensor, state[original]):
                    raise ValueError(
                        f"{source}: {name!r} differs from {original!r} but the config says "
                        f"they are tied (tie_embeddings=true); refusing to discard the stored "
                        f"{name!r} (was the model saved untied? set tie_embeddings to false)")
                del state[name]
        result = nn.Module.load_state_dict(self, state, strict=False, assign=True)
        missing = [k for k in result.missing_keys if first_name[id(params[k])] == k]
        if missing or result.unexpected_keys:
            raise ValueError(f"{source} does not match the model: missing {missing[:8]}, "
                             f"unexpected {result.unexpected_keys[:8]}")
        self.tie_weights()
        return self.eval()
