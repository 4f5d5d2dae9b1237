"""Importing the reference checkpoint: names, the GQA head permutation, safety.

The expected logits come from a float64 re-implementation of the reference
model's math (microsoft/encoder-decoder-slm ``mu_utils.py``): K/V heads repeated by
concatenation (query head h reads K/V head h % n_kv), centred encoder positions
``pos - (L-1)//2``, masks from pad ids filled with ``finfo.min``, GELU(tanh) MLP,
untied-from-nothing tied embeddings, no logit scaling.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastencdec import convert
from fastencdec.convert import import_mu_checkpoint

DIMS = dict(vocab=300, d=64, n_enc=2, n_dec=2, n_heads=6, n_kv=3, head_dim=32, d_ff=96)


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_state_dict(gen: torch.Generator, dims=DIMS) -> dict[str, torch.Tensor]:
    d, q, kv, ff = dims["d"], dims["n_heads"] * dims["head_dim"], dims["n_kv"] * dims["head_dim"], dims["d_ff"]

    def w(*shape, std=0.15):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(torch.bfloat16)

    def norm():
        return (1 + 0.3 * torch.rand(d, generator=gen, dtype=torch.float64)).to(torch.bfloat16)

    def attn(prefix):
        return {f"{prefix}.q_linear.weight": w(q, d), f"{prefix}.q_linear.bias": w(q),
                f"{prefix}.k_linear.weight": w(kv, d), f"{prefix}.k_linear.bias": w(kv),
                f"{prefix}.v_linear.weight": w(kv, d), f"{prefix}.v_linear.bias": w(kv),
                f"{prefix}.out_linear.weight": w(d, q), f"{prefix}.out_linear.bias": w(d)}

    def mlp(prefix):
        return {f"{prefix}.fc1.weight": w(ff, d), f"{prefix}.fc1.bias": w(ff),
                f"{prefix}.fc2.weight": w(d, ff), f"{prefix}.fc2.bias": w(d)}

    sd = {"transformer.wte.weight": w(dims["vocab"], d, std=0.5)}
    for i in range(dims["n_enc"]):
        p = f"transformer.e.{i}"
        sd.update({f"{p}.ln1.weight": norm(), f"{p}.ln2.weight": norm()})
        sd.update(attn(f"{p}.attn"))
        sd.update(mlp(f"{p}.mlp"))
    sd["transformer.ln_e.weight"] = norm()
    for i in range(dims["n_dec"]):
        p = f"transformer.h.{i}"
        sd.update({f"{p}.ln{j}.weight": norm() for j in (1, 2, 3)})
        sd.update(attn(f"{p}.causal_attn"))
        sd.update(attn(f"{p}.cross_attn"))
        sd.update(mlp(f"{p}.mlp"))
    sd["transformer.ln_f.weight"] = norm()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def reference_logits(sd, enc_ids, dec_ids, dims=DIMS, pad=0, theta=10000.0):
    """The reference model's forward (eval mode), in float64."""
    sd = {k: v.to(torch.float64) for k, v in sd.items()}
    n_heads, n_kv, hd = dims["n_heads"], dims["n_kv"], dims["head_dim"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def linear(x, p):
        return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    def rope(x, centred):
        L = x.shape[2]
        inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        pos = torch.arange(L, dtype=torch.float64)
        if centred:
            pos = pos - (L - 1) // 2
        emb = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)
        rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)
        return x * emb.cos() + rot * emb.sin()

    def attention(p, xq, xkv, mask, causal, use_rope):
        B, Lq, Lk = xq.shape[0], xq.shape[1], xkv.shape[1]
        q = linear(xq, f"{p}.q_linear").view(B, Lq, n_heads, hd).transpose(1, 2)
        k = linear(xkv, f"{p}.k_linear").view(B, Lk, n_kv, hd).transpose(1, 2)
        v = linear(xkv, f"{p}.v_linear").view(B, Lk, n_kv, hd).transpose(1, 2)
        if use_rope:
            q, k = rope(q, centred=not causal), rope(k, centred=not causal)
        k = torch.cat([k] * (n_heads // n_kv), dim=1)  # head h reads K/V head h % n_kv
        v = torch.cat([v] * (n_heads // n_kv), dim=1)
        scores = q @ k.transpose(-1, -2)
        m = mask[:, None, None, :]
        if causal:
            m = m & torch.ones(Lq, Lq, dtype=torch.bool).tril()
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores / math.sqrt(hd), dim=-1) @ v
        return linear(out.transpose(1, 2).reshape(B, Lq, n_heads * hd), f"{p}.out_linear")

    def mlp(x, p):
        return linear(torch.nn.functional.gelu(linear(x, f"{p}.fc1"), approximate="tanh"),
                      f"{p}.fc2")

    enc_mask, dec_mask = enc_ids != pad, dec_ids != pad
    e = sd["transformer.wte.weight"][enc_ids]
    for i in range(dims["n_enc"]):
        p = f"transformer.e.{i}"
        h = rms(e, sd[f"{p}.ln1.weight"])
        e = e + attention(f"{p}.attn", h, h, enc_mask, causal=False, use_rope=True)
        e = e + mlp(rms(e, sd[f"{p}.ln2.weight"]), f"{p}.mlp")
    e = rms(e, sd["transformer.ln_e.weight"])
    x = sd["transformer.wte.weight"][dec_ids]
    for i in range(dims["n_dec"]):
        p = f"transformer.h.{i}"
        h = rms(x, sd[f"{p}.ln1.weight"])
        x = x + attention(f"{p}.causal_attn", h, h, dec_mask, causal=True, use_rope=True)
        x = x + attention(f"{p}.cross_attn", rms(x, sd[f"{p}.ln2.weight"]), e, enc_mask,
                          causal=False, use_rope=False)
        x = x + mlp(rms(x, sd[f"{p}.ln3.weight"]), f"{p}.mlp")
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.fixture
def checkpoint(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    sd = reference_state_dict(gen)
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": sd, "step": 1000}, path)
    enc = torch.randint(3, DIMS["vocab"], (2, 9), generator=gen)
    enc[1, 6:] = 0  # right padding, pad id 0 as in the reference
    dec = torch.randint(3, DIMS["vocab"], (2, 5), generator=gen)
    dec[1, 0] = 1  # BOS
    dec[0, 4:] = 0
    return path, sd, enc, dec


@pytest.mark.filterwarnings("ignore:fastencdec.ops")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_import_matches_reference_math(checkpoint, dtype, tol):
    path, sd, enc, dec = checkpoint
    model = import_mu_checkpoint(path, dtype=dtype, head_dim=DIMS["head_dim"], eos_token_id=2)
    c = model.config
    assert (c.n_heads, c.n_kv_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff) == (6, 3, 2, 2, 96)
    assert c.tie_embeddings and model.lm_head.weight is model.embed.weight
    assert model.embed.weight.dtype == dtype
    expected = reference_logits(sd, enc, dec)
    with torch.no_grad():
        got = model(enc, enc != 0, decoder_input_ids=dec, decoder_attention_mask=dec != 0).logits
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


@pytest.mark.filterwarnings("ignore:fastencdec.ops")
def test_head_permutation_is_needed(checkpoint, monkeypatch):
    path, sd, enc, dec = checkpoint
    monkeypatch.setattr(convert, "reference_head_order", lambda n, kv: torch.arange(n))
    model = import_mu_checkpoint(path, dtype=torch.float64, head_dim=DIMS["head_dim"],
                                 eos_token_id=2)
    with torch.no_grad():
        got = model(enc, enc != 0, decoder_input_ids=dec).logits
    assert not torch.allclose(got, reference_logits(sd, enc, dec), atol=1e-3)


def test_head_order_maps_to_the_same_kv_head():
    for n_heads, n_kv in [(6, 3), (8, 2), (4, 4), (8, 1)]:
        perm = convert.reference_head_order(n_heads, n_kv)
        assert sorted(perm.tolist()) == list(range(n_heads))
        group = n_heads // n_kv
        assert all(int(perm[j]) % n_kv == j // group for j in range(n_heads))


class NotATensor:
    pass


def test_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"x": NotATensor()}}, path)
    with pytest.raises(ValueError, match="weights_only"):
        import_mu_checkpoint(path)


def test_rejects_wrong_contents(tmp_path, checkpoint):
    path = tmp_path / "other.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="not a reference checkpoint"):
        import_mu_checkpoint(path)
    _, sd, _, _ = checkpoint
    torch.save({"model_state_dict": {**sd, "transformer.extra.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="unexpected tensor"):
        import_mu_checkpoint(path, head_dim=DIMS["head_dim"], eos_token_id=2)
