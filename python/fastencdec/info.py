"""What this installation can run: versions, compiled CPU kernels, Triton/CUDA, backends."""

from __future__ import annotations

import os
import platform

import torch

from .ops import dispatch


def collect() -> dict:
    info: dict = {
        "fastencdec": _version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report, never fail
        info["triton"] = f"not available ({type(exc).__name__})"
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        from . import _C

        info["cpp"] = {
            "compiled_isas": _C.compiled_isas(),
            "active_isa": _C.active_isa(),
            "openmp": _C.openmp(),
            "hardware_threads": _C.hardware_threads(),
        }
    except Exception as exc:  # noqa: BLE001
        info["cpp"] = f"not available ({type(exc).__name__}: {exc})"
    info["forced_backend"] = dispatch.forced_backend() or "none"
    info["backends_cpu"] = dispatch.summary("cpu")
    if torch.cuda.is_available():
        info["backends_cuda"] = dispatch.summary("cuda")
    return info


def _version() -> str:
    from . import __version__

    return __version__


def format_info(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k:<26} {v}" for k, v in value.items())
        else:
            lines.append(f"{key:<28} {value}")
    return "\n".join(lines)
