"""Rotary position embedding (rotate-half convention), plain PyTorch.

The ground truth for every RoPE implementation in the project: angles are
computed in float64 and applied in the input's dtype promoted to at least fp32.
"""

from __future__ import annotations

import torch

__all__ = ["rope_base", "rope_inv_freq", "normalize_positions", "rope_cos_sin", "apply_rope"]


def rope_base(
    theta: float,
    head_dim: int,
    seq_len: int,
    scaling_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> float:
    """Effective RoPE base after dynamic NTK scaling (DESIGN §1).

    With ``scaling_factor > 1`` and a sequence longer than ``max_position_embeddings``
    the base grows to ``theta * ((f * L / L_max) - (f - 1)) ** (d / (d - 2))``;
    for ``L <= L_max`` (and for ``f <= 1``) it is ``theta`` unchanged.
    """
    if scaling_factor <= 1.0:
        return float(theta)
    if max_position_embeddings is None:
        raise ValueError(
            "rope scaling_factor > 1 needs max_position_embeddings (the trained context length)"
        )
    f = float(scaling_factor)
    l_eff = max(int(seq_len), int(max_position_embeddings))
    ratio = (f * l_eff / max_position_embeddings) - (f - 1.0)
    return float(theta) * ratio ** (head_dim / (head_dim - 2))


def rope_inv_freq(head_dim: int, base: float, device=None) -> torch.Tensor:
    """``base ** (-2i / d)`` for ``i`` in ``[0, d/2)``, float64."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return torch.pow(torch.tensor(float(base), dtype=torch.float64, device=device), -exponents)


def normalize_positions(positions, batch: int, seq_len: int, device) -> torch.Tensor:
    """Turn ``None`` / an int offset / a 0-d tensor / a ``[B, L]`` tensor into int64 ``[B, L]``."""
    if positions is None:
        positions = 0
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:
        return positions.to(device=device, dtype=torch.int64)
    start = int(positions)
    row = torch.arange(start, start + seq_len, dtype=torch.int64, device=device)
    return row.unsqueeze(0).expand(batch, seq_len)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float):
    """cos/sin of shape ``[B, L, 1, D]`` in float64 for int positions ``[B, L]``."""
    inv_freq = rope_inv_freq(head_dim, base, device=positions.device)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [B, L, D/2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # [B, L, 1, D]
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(
    x: torch.Tensor,
    positions=None,
    theta: float = 10000.0,
    scaling_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, H, D]`` by RoPE at ``positions`` (``[B, L]`` ints or a start offset).

    Returns a tensor of ``x``'s dtype. The sequence length used for dynamic NTK
    scaling is ``max(positions) + 1``.
    """
    batch, seq_len, _, head_dim = x.shape
    pos = normalize_positions(positions, batch, seq_len, x.device)
    seen_len = int(pos.max().item()) + 1 if pos.numel() else 0
    base = rope_base(theta, head_dim, seen_len, scaling_factor, max_position_embeddings)
    cos, sin = rope_cos_sin(pos, head_dim, base)
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    out = xc * cos.to(compute) + _rotate_half(xc) * sin.to(compute)
    return out.to(x.dtype)
