"""``apply_rope``: validate, then run the chosen backend."""

from __future__ import annotations

import torch

from . import dispatch, validate


def apply_rope(
    x: torch.Tensor,
    positions=None,
    theta: float = 10000.0,
    scaling_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, H, D]`` (rotate-half RoPE) at ``positions``: int ``[B, L]``,
    an int start offset, or None (= 0). Dynamic NTK scaling when ``scaling_factor > 1``.
    Returns a new tensor of ``x``'s dtype."""
    validate.tensor("x", x, ndim=4, layout="[batch, seq, heads, head_dim]")
    batch, seq_len, _, head_dim = x.shape
    validate.rope_head_dim("x", head_dim)
    validate.positions(positions, batch, seq_len, x.device)
    validate.rope_scaling(scaling_factor, max_position_embeddings)
    if not float(theta) > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    return dispatch.call(
        "apply_rope", x, positions, theta, scaling_factor, max_position_embeddings,
        device=x.device, needs_grad=dispatch.needs_grad(x),
    )
