"""``rms_norm``: check, then run the chosen backend (DESIGN §3).

The kernels serve inference; with gradients, or while a graph is compiled (where
the compiler fuses the plain expression itself), the reference expression runs.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from . import dispatch, validate


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * weight``, computed
    in fp32 (float64 stays float64), returned in ``x``'s dtype. ``x`` ``[..., D]`` any
    float dtype, ``weight`` ``[D]``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in validate.FLOAT_DTYPES:
        validate.tensor("x", x, ndim=max(getattr(x, "ndim", 1), 1), layout="[..., dim]")
    validate.tensor("weight", weight, ndim=1, layout="[dim]")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} elements but x's last dimension is "
                         f"{x.shape[-1]}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) \
            or torch.compiler.is_compiling():
        return reference.rms_norm(x, weight, float(eps))
    return dispatch.run("rms_norm", x.device.type, x, weight, float(eps))
