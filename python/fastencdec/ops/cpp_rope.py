"""``apply_rope`` on the C++ kernel (fp32 compute; fp16/bf16 inputs are converted)."""

from __future__ import annotations

import torch

from ..reference.rope import normalize_positions, rope_base


def apply_rope(x, positions=None, theta=10000.0, scaling_factor=1.0, max_position_embeddings=None):
    from fastencdec import _C

    batch, seq_len, heads, head_dim = x.shape
    pos = normalize_positions(positions, batch, seq_len, x.device).contiguous()
    seen_len = int(pos.max()) + 1 if pos.numel() else 0
    base = rope_base(theta, head_dim, seen_len, scaling_factor, max_position_embeddings)
    x32 = x.detach().to(torch.float32).contiguous()
    out = torch.empty_like(x32)
    if x32.numel():
        _C.rope_apply(
            x32.view(batch * seq_len, heads, head_dim).numpy(),
            pos.view(batch * seq_len).numpy(),
            float(base),
            out.view(batch * seq_len, heads, head_dim).numpy(),
            torch.get_num_threads(),
        )
    return out.to(x.dtype)


def _unsupported(x, *args, **kwargs):
    return "float64 inputs have no C++ kernel" if x.dtype == torch.float64 else None


apply_rope.unsupported = _unsupported
