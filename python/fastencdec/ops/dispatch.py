"""The one place that decides which implementation of an op runs.

Rules (DESIGN §3):
- ``FASTENCDEC_BACKEND=reference|triton|cpp`` forces a backend for every op.
- Otherwise CUDA tensors go to Triton and CPU tensors to the C++ kernels.
- A backend that cannot run here, or has no kernel for an op, runs the reference
  (said once with a warning, except for the CPU training ops: the C++ kernels are
  inference-only by design). A kernel may also refuse particular inputs through its
  ``unsupported(*args) -> reason | None`` hook (e.g. float64, an odd head size): those
  run the reference, said once per (op, reason). That is the only fallback mechanism.

Each (op, backend, device type) is resolved once and cached; a call then costs a
dict lookup, the environment read and the kernel's ``unsupported`` hook. Backends
live in ``ops/backends/`` and are imported on first use, so importing fastencdec
never needs Triton or the compiled module.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

BACKENDS = ("reference", "triton", "cpp")
ENV_VAR = "FASTENCDEC_BACKEND"
DEFAULT_BACKEND = {"cuda": "triton", "cpu": "cpp"}

# Ops a backend may lack without a warning under the automatic choice: the C++
# kernels serve inference, training on the CPU runs the reference by design.
TRAINING_OPS = ("self_attention_with_lse", "cross_attention_with_lse", "attention_backward")


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one op, in the op's canonical signature
    (``ops/schema.py``); ``unsupported`` names inputs it cannot take, or is None."""

    fn: Callable
    unsupported: Callable | None = None


_warned: set[tuple[str, str]] = set()
_resolved: dict[tuple[str, str | None, str], tuple[str, Kernel]] = {}


try:  # os.environ.get re-encodes the key on every call: read the mapping directly
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey(ENV_VAR)
    _decode = os.environ.decodevalue
except AttributeError:  # another Python implementation
    _ENV_DATA = None


def forced_backend() -> str | None:
    if _ENV_DATA is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        value = None if raw is None else _decode(raw)
    else:
        value = os.environ.get(ENV_VAR)
    if not value:
        return None
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


@cache
def kernels(backend: str) -> dict[str, Kernel]:
    """The ``KERNELS`` table of a backend module (imported once)."""
    return importlib.import_module(f"fastencdec.ops.backends.{backend}").KERNELS


@cache
def triton_usable(device_type: str) -> bool:
    """Triton runs on CUDA, or on the CPU under its interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def cpp_usable() -> bool:
    try:
        from fastencdec import _C  # noqa: F401
    except Exception:
        return False
    return True


def backend_usable(backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if backend == "triton":
        return triton_usable(device_type)
    return device_type == "cpu" and cpp_usable()


def warn_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastencdec.ops.{op}: {reason}; using the reference implementation",
                      stacklevel=4)


def _resolve_backend(op: str, forced: str | None, device_type: str) -> tuple[str, Kernel]:
    wanted = forced or DEFAULT_BACKEND.get(device_type, "reference")
    if wanted != "reference":
        if not backend_usable(wanted, device_type):
            warn_once(op, f"the {wanted} backend cannot run on {device_type}")
        elif op in kernels(wanted):
            return wanted, kernels(wanted)[op]
        elif forced or op not in TRAINING_OPS:
            warn_once(op, f"no {wanted} kernel")
    return "reference", kernels("reference")[op]


def resolve(op: str, device_type: str, args: tuple | None = None) -> tuple[str, Kernel]:
    """``(backend name, kernel)`` that runs ``op`` for inputs on ``device_type``;
    with ``args`` (canonical) the kernel's ``unsupported`` hook is consulted too."""
    forced = forced_backend()
    key = (op, forced, device_type)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve_backend(op, forced, device_type)
    if args is not None and found[1].unsupported is not None:
        reason = found[1].unsupported(*args)
        if reason:
            warn_once(op, reason)
            return "reference", kernels("reference")[op]
    return found


def run(op: str, device_type: str, *args):
    """Run ``op`` (canonical arguments, see ``ops/schema.py``) on the chosen backend."""
    return resolve(op, device_type, args)[1].fn(*args)


def choose_backend(op: str, device: torch.device | str) -> str:
    """Name the backend that would run ``op`` for usual inputs on ``device``."""
    return resolve(op, torch.device(device).type)[0]


def summary(device: str = "cpu") -> dict[str, str]:
    """Backend each public op would use for inference inputs on ``device``."""
    public = ("apply_rope", "rms_norm", "self_attention", "cross_attention",
              "decode_attention", "append_kv_cache", "distill_loss", "distill_loss_from_logits",
              "distill_loss_from_teacher_hidden")
    return {op: choose_backend(op, device) for op in public}


def clear_cache() -> None:
    """Forget resolved backends and said warnings (after changing what is installed)."""
    _resolved.clear()
    _warned.clear()
