"""A small re-implementation of the reference model ("Return of the Encoder"'s public
code), written from its description in DESIGN §1 and independent of fastencdec's
modules, for parity tests of the importer and of generation.

What it reproduces, on purpose:
- its ``model_config`` (``n_encoder_layer``, ``n_embd``, ``qkv_embd``, ``is_interleaved``,
  ``block_size``, ``rope_factor``, ...) and its ``transformer.*`` parameter names;
- GQA by concatenation (query head ``h`` reads K/V head ``h % n_kv_head``) or, with
  ``is_interleaved``, by expansion (``h // group``);
- centred encoder positions ``pos - (L - 1) // 2``;
- RoPE tables in float32 with dynamic NTK scaling: every forward call uses the base
  for its *current* length ``L`` (``L_eff = max(L, block_size)``), so during
  generation every key is re-rotated each step;
- RMSNorm in float32, GELU(tanh) MLP with biases, tied LM head;
- masks from pad ids (``id == pad_token_id`` is padding, in the encoder *and* the
  decoder: a generated pad token is masked in later steps), filled with ``finfo.min``;
- no KV cache: greedy generation recomputes every position at every step.
"""

from __future__ import annotations

import math

import torch

NORM_EPS = 1e-6


def model_config(**fields) -> dict:
    """A reference ``model_config`` dict (plain types) for a small model."""
    config = dict(n_encoder_layer=2, n_decoder_layer=2, n_embd=64, qkv_embd=384,
                  is_interleaved=False, hidden_dim=96, n_head=12, n_kv_head=6, block_size=32,
                  dropout=0.0, rope_theta=10000.0, rope_factor=1.0, pad_token_id=0,
                  vocab_size=300)
    config.update(fields)
    return config


def random_state_dict(config: dict, generator: torch.Generator, std: float = 0.15,
                      embed_std: float = 0.5, qk_std: float | None = None
                      ) -> dict[str, torch.Tensor]:
    """Random bf16 weights under the reference's names; ``lm_head.weight`` is the
    embedding tensor itself (tied), as the reference saves it. ``qk_std`` (default
    ``std``) sets the self-attention q/k projections: larger values sharpen attention,
    so outputs depend strongly on RoPE (positions and NTK base)."""
    qk_std = std if qk_std is None else qk_std
    d, q = config["n_embd"], config["qkv_embd"]
    kv = config["n_kv_head"] * (q // config["n_head"])
    ff = config["hidden_dim"]

    def w(*shape, scale=std):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
                ).to(torch.bfloat16)

    def norm():
        return (0.7 + 0.6 * torch.rand(d, generator=generator, dtype=torch.float64)
                ).to(torch.bfloat16)

    def attn(p, qk=std):
        return {f"{p}.q_linear.weight": w(q, d, scale=qk), f"{p}.q_linear.bias": w(q),
                f"{p}.k_linear.weight": w(kv, d, scale=qk), f"{p}.k_linear.bias": w(kv),
                f"{p}.v_linear.weight": w(kv, d), f"{p}.v_linear.bias": w(kv),
                f"{p}.out_linear.weight": w(d, q), f"{p}.out_linear.bias": w(d)}

    def mlp(p):
        return {f"{p}.fc1.weight": w(ff, d), f"{p}.fc1.bias": w(ff),
                f"{p}.fc2.weight": w(d, ff), f"{p}.fc2.bias": w(d)}

    sd = {"transformer.wte.weight": w(config["vocab_size"], d, scale=embed_std)}
    for i in range(config["n_encoder_layer"]):
        p = f"transformer.e.{i}"
        sd.update({f"{p}.ln1.weight": norm(), f"{p}.ln2.weight": norm()})
        sd.update(attn(f"{p}.attn", qk_std))
        sd.update(mlp(f"{p}.mlp"))
    sd["transformer.ln_e.weight"] = norm()
    for i in range(config["n_decoder_layer"]):
        p = f"transformer.h.{i}"
        sd.update({f"{p}.ln{j}.weight": norm() for j in (1, 2, 3)})
        sd.update(attn(f"{p}.causal_attn", qk_std))
        sd.update(attn(f"{p}.cross_attn"))
        sd.update(mlp(f"{p}.mlp"))
    sd["transformer.ln_f.weight"] = norm()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def save_checkpoint(path, state: dict[str, torch.Tensor], config: dict) -> None:
    """The reference's ``model.pt`` layout."""
    torch.save({"model_state_dict": state, "model_config": dict(config), "step": 1000}, path)


class MuReference:
    """The reference model's forward on a state dict, computed in float32 like the
    reference (``dtype=torch.float64`` computes everything, RoPE tables included, in
    float64: a rounding-free yardstick, not the reference's own numerics)."""

    def __init__(self, state: dict[str, torch.Tensor], config: dict,
                 dtype: torch.dtype = torch.float32, mask_decoder_pads: bool = True,
                 rotate_once: bool = False):
        # Not the reference, variants that let tests show that a case depends on what it
        # tests: mask_decoder_pads=False leaves generated pad tokens visible;
        # rotate_once=True gives decoder position p the NTK base of length p + 1 (a KV
        # cache that rotates each key once, when it is appended).
        self.mask_decoder_pads = mask_decoder_pads
        self.rotate_once = rotate_once
        self.dtype = dtype
        self.w = {k: v.to(dtype) for k, v in state.items()}
        self.c = config
        self.n_head, self.n_kv = config["n_head"], config["n_kv_head"]
        self.head_dim = config["qkv_embd"] // config["n_head"]

    # -- pieces -------------------------------------------------------------------------
    def rms(self, x, name):
        return self.w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS))

    def linear(self, x, name):
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def inv_freq(self, seq_len: int) -> torch.Tensor:
        """RoPE frequencies for a forward call over ``seq_len`` positions (dynamic NTK)."""
        d, base, f = self.head_dim, self.c["rope_theta"], self.c["rope_factor"]
        if f > 1.0:
            l_max = self.c["block_size"]
            l_eff = max(seq_len, l_max)
            base = base * ((f * l_eff / l_max) - (f - 1)) ** (d / (d - 2))
        return 1.0 / (base ** (torch.arange(0, d, 2, dtype=self.dtype) / d))

    def rope_tables(self, seq_len: int, centred: bool):
        """cos/sin ``[L, D]`` (float32 in the reference); the NTK base depends on this
        call's length."""
        pos = torch.arange(seq_len, dtype=self.dtype)
        if centred:
            pos = pos - (seq_len - 1) // 2
        if self.rotate_once and not centred:
            freqs = torch.stack([p * self.inv_freq(int(p) + 1) for p in pos])
        else:
            freqs = torch.outer(pos, self.inv_freq(seq_len))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def repeat_kv(self, x):
        """``[B, n_kv, L, D]`` -> ``[B, n_head, L, D]``."""
        group = self.n_head // self.n_kv
        if self.c["is_interleaved"]:  # expand: head h reads K/V head h // group
            return x.repeat_interleave(group, dim=1)
        return torch.cat([x] * group, dim=1)  # concatenation: head h reads h % n_kv

    def attention(self, name, xq, xkv, key_mask, *, causal, rope):
        B, Lq, Lk, D = xq.shape[0], xq.shape[1], xkv.shape[1], self.head_dim
        q = self.linear(xq, f"{name}.q_linear").view(B, Lq, self.n_head, D).transpose(1, 2)
        k = self.linear(xkv, f"{name}.k_linear").view(B, Lk, self.n_kv, D).transpose(1, 2)
        v = self.linear(xkv, f"{name}.v_linear").view(B, Lk, self.n_kv, D).transpose(1, 2)
        if rope:  # self-attention only: Lq == Lk
            cos, sin = self.rope_tables(Lq, centred=not causal)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        scores = q @ k.transpose(-1, -2)
        allowed = key_mask[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores / math.sqrt(D), dim=-1) @ v
        return self.linear(out.transpose(1, 2).reshape(B, Lq, self.n_head * D),
                           f"{name}.out_linear")

    def mlp(self, x, name):
        h = self.linear(x, f"{name}.fc1")
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))
        return self.linear(h, f"{name}.fc2")

    # -- the model ----------------------------------------------------------------------
    def encode(self, ids):
        """Final encoder states and the key mask (``ids != pad``)."""
        mask = ids != self.c["pad_token_id"]
        x = self.w["transformer.wte.weight"][ids]
        for i in range(self.c["n_encoder_layer"]):
            p = f"transformer.e.{i}"
            h = self.rms(x, f"{p}.ln1.weight")
            x = x + self.attention(f"{p}.attn", h, h, mask, causal=False, rope=True)
            x = x + self.mlp(self.rms(x, f"{p}.ln2.weight"), f"{p}.mlp")
        return self.rms(x, "transformer.ln_e.weight"), mask

    def decoder_hidden(self, dec_ids, enc_states, enc_mask):
        """Final decoder states (after ``ln_f``), before the LM head."""
        mask = dec_ids != self.c["pad_token_id"]
        if not self.mask_decoder_pads:
            mask = torch.ones_like(mask)
        x = self.w["transformer.wte.weight"][dec_ids]
        for i in range(self.c["n_decoder_layer"]):
            p = f"transformer.h.{i}"
            h = self.rms(x, f"{p}.ln1.weight")
            x = x + self.attention(f"{p}.causal_attn", h, h, mask, causal=True, rope=True)
            x = x + self.attention(f"{p}.cross_attn", self.rms(x, f"{p}.ln2.weight"), enc_states,
                                   enc_mask, causal=False, rope=False)
            x = x + self.mlp(self.rms(x, f"{p}.ln3.weight"), f"{p}.mlp")
        return self.rms(x, "transformer.ln_f.weight")

    def logits(self, enc_ids, dec_ids):
        enc_states, enc_mask = self.encode(enc_ids)
        return self.decoder_hidden(dec_ids, enc_states, enc_mask) @ self.w["lm_head.weight"].T

    def step_logits(self, enc_ids, bos: int, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T + 1, V]``: for each step ``t`` the last-position logits of a full
        recomputation on ``[BOS] + tokens[:, :t]`` (what the reference's greedy decoding
        sees at step ``t``: its decoder length, hence its NTK base, grows each step)."""
        enc_states, enc_mask = self.encode(enc_ids)
        bos_col = torch.full((enc_ids.shape[0], 1), bos, dtype=torch.long)
        steps = []  # one full recomputation per step, as the reference decodes
        for t in range(tokens.shape[1] + 1):
            dec = torch.cat([bos_col, tokens[:, :t]], dim=1)
            hidden = self.decoder_hidden(dec, enc_states, enc_mask)[:, -1]
            steps.append(hidden @ self.w["lm_head.weight"].T)
        return torch.stack(steps, dim=1)

    def greedy(self, enc_ids, bos: int, max_new_tokens: int) -> torch.Tensor:
        """Greedy tokens ``[B, max_new_tokens]``, recomputing everything every step."""
        enc_states, enc_mask = self.encode(enc_ids)
        dec = torch.full((enc_ids.shape[0], 1), bos, dtype=torch.long)
        for _ in range(max_new_tokens):
            hidden = self.decoder_hidden(dec, enc_states, enc_mask)[:, -1]
            nxt = (hidden @ self.w["lm_head.weight"].T).argmax(-1)
            dec = torch.cat([dec, nxt[:, None]], dim=1)
        return dec[:, 1:]


__all__ = ["model_config", "random_state_dict", "save_checkpoint", "MuReference"]
