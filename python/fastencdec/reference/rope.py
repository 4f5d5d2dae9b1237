"""Rotary position embedding (rotate-half convention), plain PyTorch.

The ground truth for every RoPE implementation in the project: angles are
computed in float64 and applied in the input's dtype promoted to at least fp32.
The base (and its dynamic NTK scaling) comes from :class:`fastencdec.spec.Rope`.
"""

from __future__ import annotations

import torch

from ..spec import Rope, as_rope, rope_base, rope_inv_freq

__all__ = ["rope_base", "rope_inv_freq", "normalize_positions", "rope_cos_sin", "apply_rope",
           "rotate"]


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


def rotate(x: torch.Tensor, positions, rope: Rope, *, inverse: bool = False) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, H, D]`` at ``positions`` (``[B, L]`` ints or a start offset)
    with the settings ``rope``; ``inverse`` turns the other way (the transpose, used
    for gradients). The NTK length is ``max(positions) + 1`` unless ``rope.seq_len``."""
    batch, seq_len, _, head_dim = x.shape
    pos = normalize_positions(positions, batch, seq_len, x.device)
    seen_len = int(pos.max().item()) + 1 if rope.needs_positions_max() and pos.numel() else 0
    cos, sin = rope_cos_sin(pos, head_dim, rope.base(head_dim, seen_len))
    if inverse:
        sin = -sin
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    out = xc * cos.to(compute) + _rotate_half(xc) * sin.to(compute)
    return out.to(x.dtype).contiguous()


def apply_rope(
    x: torch.Tensor,
    positions=None,
    theta: float = 10000.0,
    scaling_factor: float = 1.0,
    max_position_embeddings: int | None = None,
    *,
    rope: Rope | None = None,
    inverse: bool = False,
) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, H, D]`` by RoPE at ``positions`` (``[B, L]`` ints or a start
    offset). Settings: ``rope=Rope(...)``, or the loose ``theta``/``scaling_factor``/
    ``max_position_embeddings``. Returns a tensor of ``x``'s dtype."""
    spec = as_rope(True, theta, scaling_factor, max_position_embeddings) if rope is None \
        else as_rope(rope, theta, scaling_factor, max_position_embeddings)
    return rotate(x, positions, spec, inverse=inverse)
