"""A static self-attention KV cache (gpt-fast style): allocated once, never concatenated.

One tensor per K and V holds every layer: ``[n_layers, rows, max_len, n_kv_heads,
head_dim]``; ``layer(i)`` gives contiguous ``[rows, max_len, Hkv, D]`` views for
``fastencdec.ops.append_kv_cache`` / ``decode_attention``. Keys are stored after RoPE.
Per row it keeps:

- ``lens`` (int32 ``[rows]``): valid entries before the tokens being fed;
- ``lens_after`` (int32): ``lens + T`` during a step of ``T`` tokens, computed once
  per step (every layer reads it) by :meth:`begin_step`;
- ``key_mask`` (bool ``[rows, max_len]``): with ``mask_generated_pad``, False where
  the token fed at that position is the pad id (the reference encoder-decoder masks
  pad tokens in its decoder input, generated ones included).

All of them change in place, so their addresses never change (a captured CUDA
graph keeps reading them).

Dynamic NTK scaling past ``max_position_embeddings``: the RoPE base then changes
with the total length, and since every layer's hidden states depend on it, the
reference model's full recomputation cannot be reproduced by re-rotating cached
keys (the K/V of later layers change too). The cache then also records the decoder's
input embeddings (``history``) so that, once the length passes the limit, each step
recomputes the decoder over everything so far, exactly as the reference does;
below the limit the base is constant and cached decoding is exact.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, n_layers: int, rows: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device, recompute_past: int | None = None,
                 d_model: int | None = None, mask_generated_pad: bool = False):
        shape = (n_layers, rows, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.lens_after = torch.zeros(rows, dtype=torch.int32, device=device)
        self.key_mask = torch.ones(rows, max_len, dtype=torch.bool, device=device)
        self.mask_generated_pad = mask_generated_pad
        self.recompute_past = recompute_past
        self.history = None
        if recompute_past is not None:
            if d_model is None:
                raise ValueError("recompute_past needs d_model (the embeddings are recorded)")
            self.history = torch.zeros(rows, max_len, d_model, dtype=dtype, device=device)
        self.total_len = 0  # host: the longest row's length after the current step

    @classmethod
    def for_model(cls, config, n_layers: int, rows: int, max_len: int, like: torch.Tensor, *,
                  mask_generated_pad: bool = False):
        """A cache for ``n_layers`` layers of ``config``'s attention, in ``like``'s dtype and
        device; it records embeddings for recomputation when dynamic NTK scaling can
        take the length past ``max_position_embeddings``."""
        limit = config.max_position_embeddings
        recompute = limit if (config.rope_scaling_factor > 1.0 and max_len > limit) else None
        return cls(n_layers, rows, max_len, config.n_kv_heads, config.head_dim,
                   dtype=like.dtype, device=like.device, recompute_past=recompute,
                   d_model=config.d_model, mask_generated_pad=mask_generated_pad)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def recomputing(self) -> bool:
        """True once the length passed the limit of a dynamically scaled RoPE."""
        return self.recompute_past is not None and self.total_len > self.recompute_past

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def _positions(self, t_new: int, device) -> torch.Tensor:
        where = self.lens.long()[:, None] + torch.arange(t_new, device=device)
        return where.clamp(max=self.max_len - 1)

    def begin_step(self, tokens: torch.Tensor, pad_id: int) -> None:
        """Before feeding ``tokens`` ``[rows, T]``: ``lens_after = lens + T`` and, with
        ``mask_generated_pad``, pad tokens marked in ``key_mask`` where they are written."""
        torch.add(self.lens, tokens.shape[1], out=self.lens_after)
        if self.mask_generated_pad:
            self.key_mask.scatter_(1, self._positions(tokens.shape[1], tokens.device),
                                   tokens != pad_id)

    def record(self, x: torch.Tensor, start: torch.Tensor | None = None) -> None:
        """Keep the embeddings ``x`` ``[rows, T, d]`` fed at this step (recomputation)."""
        if self.history is None:
            return
        if start is None:
            where = self._positions(x.shape[1], x.device)
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            self.history[rows, where] = x.to(self.history.dtype)
        else:  # a prefill: columns 0..T-1 of every copy of each prompt
            per_prompt = self.history.shape[0] // x.shape[0]
            self.history.view(x.shape[0], per_prompt, *self.history.shape[1:])[
                :, :, :x.shape[1]] = x.unsqueeze(1).to(self.history.dtype)

    def replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings [rows, L, d], mask [rows, L])`` of everything fed so far, ``L`` the
        longest row; the mask marks each row's real (and, with ``mask_generated_pad``,
        non-pad) positions."""
        total = self.total_len
        valid = torch.arange(total, device=self.lens.device)[None, :] < self.lens_after[:, None]
        return self.history[:, :total], valid & self.key_mask[:, :total]

    def advance(self, n: int = 1) -> None:
        self.lens.add_(n)
