"""The dynamic NTK RoPE base (see :mod:`fastencdec.spec`, which re-exports it), in a
module of its own so that the torch-free runtime computes it exactly as the models do."""

from __future__ import annotations


def rope_base(theta: float, head_dim: int, seq_len: int, scaling_factor: float = 1.0,
              max_position_embeddings: int | None = None) -> float:
    """Effective RoPE base after dynamic NTK scaling (the formula: fastencdec.spec)."""
    if scaling_factor <= 1.0:
        return float(theta)
    if max_position_embeddings is None:
        raise ValueError("rope_scaling_factor > 1 needs max_position_embeddings "
                         "(the trained context length)")
    if head_dim <= 2:
        raise ValueError(f"dynamic NTK scaling needs head_dim > 2, got {head_dim}")
    f = float(scaling_factor)
    l_eff = max(int(seq_len), int(max_position_embeddings))
    ratio = (f * l_eff / max_position_embeddings) - (f - 1.0)
    return float(theta) * ratio ** (head_dim / (head_dim - 2))
