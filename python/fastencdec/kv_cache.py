"""A static self-attention KV cache (gpt-fast style): allocated once, never concatenated.

One tensor per K and V holds every layer: ``[n_layers, rows, max_len, n_kv_heads,
head_dim]``; ``layer(i)`` gives contiguous ``[rows, max_len, Hkv, D]`` views for
``fastencdec.ops.append_kv_cache`` / ``decode_attention``. Per row it keeps:

- ``lens`` (int32 ``[rows]``): valid entries before the tokens being fed;
- ``lens_after`` (int32): ``lens + T`` during a step of ``T`` tokens, computed once
  per step (every layer reads it) by :meth:`begin_step`;
- ``key_mask`` (bool ``[rows, max_len]``): False where the token at that position
  is the pad id (a generated pad is masked in later steps, as the reference model
  masks pad tokens in its decoder input).

All of them change in place, so their addresses never change (a captured CUDA
graph keeps reading them).

Keys are stored after RoPE, except with dynamic NTK scaling on a cache that can
outgrow ``max_position_embeddings`` (``rotate_at_read``): the base then changes with
the length, so the reference model rotates every key with the base of the current
total length at every step. The cache then keeps unrotated keys and the attention
rotates them when it reads them (exact; measured no slower than re-rotating the
stored keys in place, which would also accumulate rounding).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, n_layers: int, rows: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device, rotate_at_read: bool = False):
        shape = (n_layers, rows, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.lens_after = torch.zeros(rows, dtype=torch.int32, device=device)
        self.key_mask = torch.ones(rows, max_len, dtype=torch.bool, device=device)
        self.rotate_at_read = rotate_at_read
        self.rope_len = 0  # host: the NTK length of the current step (rotate_at_read only)

    @classmethod
    def for_model(cls, config, n_layers: int, rows: int, max_len: int, like: torch.Tensor):
        """A cache for ``n_layers`` layers of ``config``'s attention, in ``like``'s dtype and
        device; keys rotate at read time when dynamic NTK scaling can change the base."""
        rotate_at_read = (config.rope_scaling_factor > 1.0
                          and max_len > config.max_position_embeddings)
        return cls(n_layers, rows, max_len, config.n_kv_heads, config.head_dim,
                   dtype=like.dtype, device=like.device, rotate_at_read=rotate_at_read)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def begin_step(self, tokens: torch.Tensor, pad_id: int) -> None:
        """Before feeding ``tokens`` ``[rows, T]``: ``lens_after = lens + T`` and pad tokens
        marked in ``key_mask`` at the positions they are written to."""
        t_new = tokens.shape[1]
        torch.add(self.lens, t_new, out=self.lens_after)
        where = self.lens.long()[:, None] + torch.arange(t_new, device=tokens.device)
        self.key_mask.scatter_(1, where.clamp(max=self.max_len - 1), tokens != pad_id)

    def advance(self, n: int = 1) -> None:
        self.lens.add_(n)
