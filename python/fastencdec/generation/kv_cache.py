"""A static self-attention KV cache (gpt-fast style): allocated once, never concatenated.

One tensor per K and V holds every layer: ``[n_layers, rows, max_len, n_kv_heads,
head_dim]``; ``layer(i)`` gives contiguous ``[rows, max_len, Hkv, D]`` views for
``fastencdec.ops.append_kv_cache`` / ``decode_attention``. ``lens`` (int32
``[rows]``) counts each row's valid entries; it is updated in place so its
address never changes (a captured CUDA graph keeps reading it).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, n_layers: int, rows: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device):
        shape = (n_layers, rows, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(rows, dtype=torch.int32, device=device)

    @classmethod
    def for_model(cls, config, n_layers: int, rows: int, max_len: int, like: torch.Tensor):
        """A cache for ``n_layers`` layers of ``config``'s attention, in ``like``'s dtype/device."""
        return cls(n_layers, rows, max_len, config.n_kv_heads, config.head_dim,
                   dtype=like.dtype, device=like.device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def advance(self, n: int = 1) -> None:
        self.lens.add_(n)
