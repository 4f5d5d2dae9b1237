"""RMSNorm, plain PyTorch: the ground truth for the norm kernels (and the training path)."""

from __future__ import annotations

import torch

__all__ = ["rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last dimension, computed in
    the input's dtype promoted to at least fp32 (float64 stays float64); the result
    has ``x``'s dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (xc * weight.to(compute)).to(x.dtype)
