"""Building blocks (DESIGN §1): RMSNorm, the two MLPs, attention modules, blocks.

The attention math (RoPE, GQA, masking, KV caches) lives in ``fastencdec.ops``;
modules here only project, reshape to ``[batch, seq, heads, head_dim]`` and call
the ops, so every backend (Triton, C++, reference) runs the same model.
Each attention module has a training/full-sequence ``forward`` and the cached
variants generation needs (``prefill``/``step`` for self-attention,
``project_kv`` + ``forward`` on precomputed K/V for cross-attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..spec import Rope
from .config import _CommonConfig


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32 for half-precision activations
    (float64 stays float64); ``ops.rms_norm`` (fused kernels in inference)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


# Without gradients, an MLP over many rows runs on blocks of _MLP_ROWS rows, so its
# [rows, d_ff] hidden activations (and the activation function's copy of them) never
# exist for all rows at once: fp32 at batch 8 x 512 tokens, ~140 MiB less at the peak.
# Rows are independent (the int8/bf16 kernels bitwise; an fp32 GEMM library may round a
# row differently with another row count), and hooks on the linear layers fire once per
# block. With gradients (training) the whole batch runs at once.
_MLP_ROWS = 1024


def _by_rows(mlp, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows <= _MLP_ROWS or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return mlp(x)
    flat = x.reshape(rows, x.shape[-1])
    first = mlp(flat[:_MLP_ROWS])
    out = first.new_empty(rows, first.shape[-1])
    out[:_MLP_ROWS] = first
    for start in range(_MLP_ROWS, rows, _MLP_ROWS):
        out[start:start + _MLP_ROWS] = mlp(flat[start:start + _MLP_ROWS])
    return out.view(*x.shape[:-1], first.shape[-1])


class GeluMLP(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` with biases (the reference checkpoint's MLP)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _by_rows(self._rows, x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if getattr(self.fc1, "activation", None) != "gelu_tanh":  # else fused into fc1
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _by_rows(self._rows, x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_mlp(config: _CommonConfig) -> nn.Module:
    return (GeluMLP if config.mlp == "gelu" else SwiGLU)(config.d_model, config.d_ff)


class _Attention(nn.Module):
    """q/k/v/out projections for ``n_heads`` query heads sharing ``n_kv_heads`` K/V heads."""

    def __init__(self, config: _CommonConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = config.attn_bias
        self.q_proj = nn.Linear(config.d_model, q_width, bias=bias)
        self.k_proj = nn.Linear(config.d_model, kv_width, bias=bias)
        self.v_proj = nn.Linear(config.d_model, kv_width, bias=bias)
        self.out_proj = nn.Linear(q_width, config.d_model, bias=bias)

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], n_heads, self.head_dim)  # [B, L, H, D]

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        return self.out_proj(o.reshape(o.shape[0], o.shape[1], self.n_heads * self.head_dim))


class SelfAttention(_Attention):
    """Self-attention with RoPE on q and k (bidirectional in the encoder, causal in decoders)."""

    def __init__(self, config: _CommonConfig, causal: bool):
        super().__init__(config)
        self.causal = causal
        self.rope = Rope(config.rope_theta, config.rope_scaling_factor,
                         config.max_position_embeddings)

    def _qkv(self, x):
        fused = self._modules.get("qkv_proj")  # set by models.quantize.fuse_projections
        if fused is not None:
            q_width = self.n_heads * self.head_dim
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = fused(x).split((q_width, kv_width, kv_width), dim=-1)
            return (self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads),
                    self._heads(v, self.n_kv_heads))
        return (self._heads(self.q_proj(x), self.n_heads),
                self._heads(self.k_proj(x), self.n_kv_heads),
                self._heads(self.v_proj(x), self.n_kv_heads))

    def forward(self, x, key_padding_mask=None, positions=None, rope_len=None) -> torch.Tensor:
        """Full sequence ``x`` ``[B, L, d]``; ``positions`` int ``[B, L]`` or None (0..L-1);
        ``rope_len`` fixes the NTK length (default: ``max(positions) + 1``)."""
        q, k, v = self._qkv(x)
        rope = self.rope if rope_len is None else self.rope.at_length(rope_len)
        o = ops.self_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                               positions=positions, rope=rope)
        return self._out(o)

    def prefill(self, x, key_padding_mask, cache, layer: int) -> torch.Tensor:
        """Causal attention over a prompt ``[B, L, d]`` at positions 0..L-1 (real tokens
        first, padding after), writing the rotated keys and the values into cache rows
        ``0..L-1``. The cache may hold ``n * B`` rows (``n`` return sequences per prompt,
        row ``b * n + i``): the prompt's K/V are broadcast into each row's copy."""
        q, k, v = self._qkv(x)
        o = ops.self_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                               positions=0, rope=self.rope)
        k = ops.apply_rope(k, 0, rope=self.rope)
        k_cache, v_cache = cache.layer(layer)
        batch, seq_len = x.shape[0], x.shape[1]
        per_prompt = k_cache.shape[0] // batch
        cache_shape = (batch, per_prompt) + tuple(k_cache.shape[1:])
        k_cache.view(cache_shape)[:, :, :seq_len] = k.unsqueeze(1).to(k_cache.dtype)
        v_cache.view(cache_shape)[:, :, :seq_len] = v.unsqueeze(1).to(v_cache.dtype)
        return self._out(o)

    def step(self, x, cache, layer: int) -> torch.Tensor:
        """``T`` new tokens ``[B, T, d]`` per row at positions ``cache.lens[b] + t``:
        append their K/V to the static caches and attend over everything cached so
        far (``cache.begin_step`` has run; ``cache.lens`` is advanced by the caller)."""
        q, k, v = self._qkv(x)
        k_cache, v_cache = cache.layer(layer)
        q = ops.append_kv_cache(q, k, v, k_cache, v_cache, cache.lens, rope=self.rope)
        o = ops.decode_attention(q, k_cache, v_cache, cache.lens_after,
                                 key_padding_mask=cache.key_mask)
        return self._out(o)


class CrossAttention(_Attention):
    """Decoder queries attend to the final encoder states (no RoPE, no causality)."""

    def project_kv(self, encoder_states: torch.Tensor):
        """Encoder K/V ``[B, Lx, Hkv, D]``: computed once per input during generation."""
        return (self._heads(self.k_proj(encoder_states), self.n_kv_heads),
                self._heads(self.v_proj(encoder_states), self.n_kv_heads))

    def forward(self, x, k, v, encoder_mask=None) -> torch.Tensor:
        """``x`` ``[R, T, d]`` where ``R`` is a multiple ``n * B`` of the encoder batch
        ``B`` (row ``b * n + i`` reads input ``b``). With ``n > 1`` the ``n`` rows of one
        input are folded into its query-length axis (a free view: ``[n * B, T, H, D]`` ->
        ``[B, n * T, H, D]``), legal because cross-attention has no causality; so the
        encoder K/V are never copied per return sequence."""
        q = self._heads(self.q_proj(x), self.n_heads)
        rows, t_new = q.shape[0], q.shape[1]
        batch = k.shape[0]
        if rows % batch:
            raise ValueError(f"cross-attention: {rows} decoder rows is not a multiple of the "
                             f"encoder batch {batch}")
        q = q.reshape(batch, (rows // batch) * t_new, self.n_heads, self.head_dim)
        o = ops.cross_attention(q, k, v, key_padding_mask=encoder_mask)
        return self._out(o.reshape(rows, t_new, self.n_heads, self.head_dim))


class Block(nn.Module):
    """Pre-norm self-attention + MLP: an encoder layer (bidirectional) or a
    decoder-only layer (causal)."""

    def __init__(self, config: _CommonConfig, causal: bool):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = SelfAttention(config, causal=causal)
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = make_mlp(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, key_padding_mask=None, positions=None, rope_len=None):
        x = x + self.dropout(self.attn(self.norm1(x), key_padding_mask, positions, rope_len))
        return x + self.dropout(self.mlp(self.norm2(x)))

    def prefill(self, x, key_padding_mask, cache, layer: int):
        x = x + self.attn.prefill(self.norm1(x), key_padding_mask, cache, layer)
        return x + self.mlp(self.norm2(x))

    def step(self, x, cache, layer: int):
        x = x + self.attn.step(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, MLP."""

    def __init__(self, config: _CommonConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = SelfAttention(config, causal=True)
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.cross_attn = CrossAttention(config)
        self.norm3 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = make_mlp(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, encoder_states, encoder_mask=None, decoder_mask=None, *,
                cross_kv=None, rope_len=None):
        """``cross_kv``: this layer's precomputed cross-attention K/V (then
        ``encoder_states`` is not read); ``rope_len`` fixes the self-attention's NTK length."""
        x = x + self.dropout(self.self_attn(self.norm1(x), decoder_mask, rope_len=rope_len))
        k, v = cross_kv if cross_kv is not None else self.cross_attn.project_kv(encoder_states)
        x = x + self.dropout(self.cross_attn(self.norm2(x), k, v, encoder_mask))
        return x + self.dropout(self.mlp(self.norm3(x)))

    def step(self, x, cache, layer: int, cross_k, cross_v, encoder_mask=None):
        x = x + self.self_attn.step(self.norm1(x), cache, layer)
        x = x + self.cross_attn(self.norm2(x), cross_k, cross_v, encoder_mask)
        return x + self.mlp(self.norm3(x))


def init_weights(module: nn.Module) -> None:
    """Normal(0, 0.02) weights and zero biases (the reference's init); norms start at 1."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
