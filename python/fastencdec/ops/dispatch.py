"""The one place that decides which implementation of an op runs.

Rules (DESIGN §3):
- ``FASTENCDEC_BACKEND=reference|triton|cpp`` forces a backend for every op.
- Otherwise CUDA tensors go to Triton and CPU tensors to the C++ kernels.
- The C++ kernels are inference-only: when autograd needs gradients the op runs
  the reference on the CPU.
- An op with no kernel for the chosen backend, an input the kernel does not
  support (``fallback_reason``), or a backend that cannot load, runs the
  reference; this is said once per (op, reason) with a warning.

Kernels register here as ``"module:function"`` strings, imported on first use so
that importing fastencdec never requires Triton or the compiled module.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache

import torch

BACKENDS = ("reference", "triton", "cpp")
ENV_VAR = "FASTENCDEC_BACKEND"

# op name -> backend -> "module:function" of the kernel entry point.
KERNELS: dict[str, dict[str, str]] = {
    "apply_rope": {"cpp": "fastencdec.ops.cpp_rope:apply_rope"},
    "self_attention": {
        "triton": "fastencdec.ops.triton_attention:self_attention",
        "cpp": "fastencdec.ops.cpp_attention:self_attention"},
    "cross_attention": {
        "triton": "fastencdec.ops.triton_attention:cross_attention",
        "cpp": "fastencdec.ops.cpp_attention:cross_attention"},
    "decode_attention": {
        "triton": "fastencdec.ops.triton_decode:decode_attention",
        "cpp": "fastencdec.ops.cpp_attention:decode_attention"},
    "append_kv_cache": {
        "triton": "fastencdec.ops.triton_decode:append_kv_cache",
        "cpp": "fastencdec.ops.cpp_attention:append_kv_cache"},
    "distill_loss": {"triton": "fastencdec.ops.triton_distill:distill_loss"},
    "distill_loss_from_logits": {
        "triton": "fastencdec.ops.triton_distill:distill_loss_from_logits"},
    "distill_loss_from_teacher_hidden": {
        "triton": "fastencdec.ops.triton_distill:distill_loss_from_teacher_hidden"},
}

REFERENCE = {
    "apply_rope": "fastencdec.reference.rope:apply_rope",
    "self_attention": "fastencdec.reference.attention:self_attention",
    "cross_attention": "fastencdec.reference.attention:cross_attention",
    "decode_attention": "fastencdec.reference.attention:decode_attention",
    "append_kv_cache": "fastencdec.reference.attention:append_kv_cache",
    "distill_loss": "fastencdec.reference.distill:distill_loss",
    "distill_loss_from_logits": "fastencdec.reference.distill:distill_loss_from_logits",
    "distill_loss_from_teacher_hidden":
        "fastencdec.reference.distill:distill_loss_from_teacher_hidden",
}

# Backends that can compute gradients (the C++ kernels are forward-only).
AUTOGRAD_BACKENDS = ("reference", "triton")

_warned: set[tuple[str, str]] = set()


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


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
                      stacklevel=3)


def choose_backend(op: str, device: torch.device, needs_grad: bool = False) -> str:
    """Name the backend that would run ``op`` for inputs on ``device`` (no warnings)."""
    backend = forced_backend()
    if backend is None:
        backend = "triton" if device.type == "cuda" else "cpp"
    if backend == "reference":
        return backend
    if needs_grad and backend not in AUTOGRAD_BACKENDS:
        return "reference"
    if backend not in KERNELS[op] or not backend_usable(backend, device.type):
        return "reference"
    return backend


def _explain_fallback(op: str, wanted: str, device: torch.device, needs_grad: bool) -> str | None:
    if needs_grad and wanted not in AUTOGRAD_BACKENDS:
        return None  # the C++ kernels are inference-only by design: not worth a warning
    if wanted not in KERNELS[op]:
        return f"no {wanted} kernel yet" if forced_backend() == wanted else None
    if not backend_usable(wanted, device.type):
        return f"the {wanted} backend cannot run on {device.type}"
    return None


def get_impl(op: str, device: torch.device, needs_grad: bool = False, fallback_reason=None):
    """Return the callable that implements ``op`` for these inputs.

    ``fallback_reason``: the caller's reason why a kernel cannot take these
    particular inputs (e.g. float64), or None.
    """
    backend = choose_backend(op, device, needs_grad)
    if backend != "reference" and fallback_reason:
        warn_once(op, fallback_reason)
        backend = "reference"
    if backend == "reference":
        wanted = forced_backend() or ("triton" if device.type == "cuda" else "cpp")
        if wanted != "reference":
            reason = _explain_fallback(op, wanted, device, needs_grad)
            if reason:
                warn_once(op, reason)
        return _load(REFERENCE[op])
    return _load(KERNELS[op][backend])


def call(op: str, *args, device: torch.device, needs_grad: bool, fallback_reason=None, **kwargs):
    """Run ``op`` on the chosen backend. A kernel entry point may carry an
    ``unsupported(*args, **kwargs) -> str | None`` hook naming inputs it cannot
    take; those run the reference (with a one-time warning)."""
    impl = get_impl(op, device, needs_grad, fallback_reason)
    hook = getattr(impl, "unsupported", None)
    if hook is not None:
        reason = hook(*args, **kwargs)
        if reason:
            warn_once(op, reason)
            impl = _load(REFERENCE[op])
    return impl(*args, **kwargs)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def summary(device: str = "cpu") -> dict[str, str]:
    """Backend each op would use for inference inputs on ``device`` (for ``fastencdec info``)."""
    dev = torch.device(device)
    return {op: choose_backend(op, dev) for op in KERNELS}
