"""``apply_rope``: check, then run the chosen backend (DESIGN §3)."""

from __future__ import annotations

import torch

from ..spec import Rope, as_rope
from . import dispatch, library, validate


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
    """Rotate ``x`` ``[B, L, H, D]`` (rotate-half RoPE) at ``positions``: int ``[B, L]``,
    an int start offset, or None (= 0). Settings: ``rope=Rope(...)``, or the loose
    ``theta``/``scaling_factor``/``max_position_embeddings`` (dynamic NTK scaling when
    ``scaling_factor > 1``). ``inverse`` rotates the other way. Returns a new tensor
    of ``x``'s dtype; differentiable."""
    validate.tensor("x", x, ndim=4, layout="[batch, seq, heads, head_dim]")
    batch, seq_len, _, head_dim = x.shape
    spec = as_rope(True if rope is None else rope, theta, scaling_factor,
                   max_position_embeddings)
    validate.rope(spec, head_dim, name="x")
    pos, offset = validate.positions(positions, batch, seq_len, x.device)
    args = (x, pos, offset, spec, bool(inverse))
    if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        return library.call("apply_rope", *args)
    return dispatch.run("apply_rope", x.device.type, *args)
