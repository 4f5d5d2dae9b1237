"""The reference attention ops against independent math (float64, <= 1e-10)."""

import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import padding_mask, rand
from fastencdec import ops, reference

TOL = dict(atol=1e-10, rtol=1e-10)


def rope_complex(x, positions, base):
    """RoPE as a complex rotation of the pairs (x_i, x_{i+D/2}): independent of rotate-half."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    inv_freq = base ** (-torch.arange(0, half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions.to(torch.float64)[..., None, None] * inv_freq
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def sdpa_expanded(q, k, v, mask, scale=None):
    """SDPA with K/V expanded per query head (h -> h // group) and a [B, Lq, Lk] bool mask."""
    group = q.shape[2] // k.shape[2]
    idx = torch.arange(q.shape[2]) // group
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k[:, :, idx], v[:, :, idx]))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], scale=scale)
    out = out.transpose(1, 2)
    has_key = mask.any(-1)[:, :, None, None]
    return torch.where(has_key, out, torch.zeros_like(out))


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 3), (8, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_sdpa(seed, hq, hkv, causal):
    b, seq, d = 3, 23, 16
    q, k, v = rand(b, seq, hq, d, dtype=torch.float64), rand(b, seq, hkv, d, dtype=torch.float64), \
        rand(b, seq, hkv, d, dtype=torch.float64)
    mask = padding_mask(b, seq, fully_masked_row=1)
    positions = torch.randint(0, 1000, (b, seq))
    out = reference.self_attention(q, k, v, causal=causal, key_padding_mask=mask,
                                   positions=positions, rope_theta=500.0, scale=0.3)
    allowed = mask[:, None, :].expand(b, seq, seq)
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool).tril()
    expected = sdpa_expanded(rope_complex(q, positions, 500.0), rope_complex(k, positions, 500.0),
                             v, allowed, scale=0.3)
    torch.testing.assert_close(out, expected, **TOL)
    assert (out[1] == 0).all()  # every key of row 1 is masked


def test_self_attention_no_rope_default_scale(seed):
    q, k, v = (rand(2, 9, 2, 8, dtype=torch.float64) for _ in range(3))
    out = reference.self_attention(q, k, v, causal=False, rope=False)
    expected = sdpa_expanded(q, k, v, torch.ones(2, 9, 9, dtype=torch.bool))
    torch.testing.assert_close(out, expected, **TOL)


def test_cross_attention_matches_sdpa(seed):
    b, lq, lk, hq, hkv, d = 2, 5, 17, 6, 2, 8
    q = rand(b, lq, hq, d, dtype=torch.float64)
    k, v = rand(b, lk, hkv, d, dtype=torch.float64), rand(b, lk, hkv, d, dtype=torch.float64)
    mask = padding_mask(b, lk)
    out = reference.cross_attention(q, k, v, key_padding_mask=mask)
    expected = sdpa_expanded(q, k, v, mask[:, None, :].expand(b, lq, lk))
    torch.testing.assert_close(out, expected, **TOL)


def test_decode_attention_equals_last_rows_of_causal_attention(seed):
    """Decoding T tokens against a cache holding the whole (rotated) sequence gives the
    last T rows of causal self-attention: the bottom-right causal alignment."""
    b, hq, hkv, d, lmax, t_new = 2, 4, 2, 8, 20, 3
    lens = torch.tensor([7, 13])
    q = rand(b, lmax, hq, d, dtype=torch.float64)
    k, v = rand(b, lmax, hkv, d, dtype=torch.float64), rand(b, lmax, hkv, d, dtype=torch.float64)
    for row, n in enumerate(lens.tolist()):
        full = reference.self_attention(q[row:row + 1, :n], k[row:row + 1, :n], v[row:row + 1, :n],
                                        causal=True)
        k_rot = reference.apply_rope(k[row:row + 1, :n], 0)
        k_cache = torch.full((1, lmax, hkv, d), float("nan"), dtype=torch.float64)
        v_cache = k_cache.clone()
        k_cache[:, :n], v_cache[:, :n] = k_rot, v[row:row + 1, :n]
        q_rot = reference.apply_rope(q[row:row + 1, n - t_new:n], n - t_new)
        out = reference.decode_attention(q_rot, k_cache, v_cache, lens[row:row + 1])
        torch.testing.assert_close(out, full[:, n - t_new:], **TOL)


def test_decode_attention_empty_row_is_zero(seed):
    q = rand(2, 1, 2, 8, dtype=torch.float64)
    cache = rand(2, 6, 1, 8, dtype=torch.float64)
    out = reference.decode_attention(q, cache, cache, torch.tensor([0, 6]))
    assert (out[0] == 0).all() and torch.isfinite(out).all()


def test_append_kv_cache_writes_rotated_keys(seed):
    b, t_new, hq, hkv, d, lmax = 2, 2, 4, 2, 8, 10
    q, k, v = rand(b, t_new, hq, d, dtype=torch.float64), rand(b, t_new, hkv, d, dtype=torch.float64), \
        rand(b, t_new, hkv, d, dtype=torch.float64)
    k_cache = torch.zeros(b, lmax, hkv, d, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    lens = torch.tensor([3, 0])
    q_rot = reference.append_kv_cache(q, k, v, k_cache, v_cache, lens, rope_theta=100.0)
    for row, start in enumerate(lens.tolist()):
        pos = torch.arange(start, start + t_new)[None]
        torch.testing.assert_close(q_rot[row:row + 1], rope_complex(q[row:row + 1], pos, 100.0), **TOL)
        torch.testing.assert_close(k_cache[row:row + 1, start:start + t_new],
                                   rope_complex(k[row:row + 1], pos, 100.0), **TOL)
        torch.testing.assert_close(v_cache[row, start:start + t_new], v[row], **TOL)
        untouched = torch.ones(lmax, dtype=torch.bool)
        untouched[start:start + t_new] = False
        assert (k_cache[row, untouched] == 0).all()


def test_apply_rope_positions_forms_agree(seed):
    x = rand(2, 5, 3, 12, dtype=torch.float64)
    by_offset = reference.apply_rope(x, 4)
    by_tensor = reference.apply_rope(x, torch.arange(4, 9).expand(2, 5))
    torch.testing.assert_close(by_offset, by_tensor, **TOL)
    torch.testing.assert_close(by_offset, rope_complex(x, torch.arange(4, 9).expand(2, 5), 1e4), **TOL)


def test_dynamic_ntk_base():
    d, theta, f, lmax = 64, 10000.0, 4.0, 128
    assert reference.rope_base(theta, d, 100, f, lmax) == theta  # within the trained length
    expected = theta * ((f * 512 / lmax) - (f - 1)) ** (d / (d - 2))
    assert math.isclose(reference.rope_base(theta, d, 512, f, lmax), expected, rel_tol=1e-15)
    x = rand(1, 512, 1, d, dtype=torch.float64)
    out = reference.apply_rope(x, 0, theta, scaling_factor=f, max_position_embeddings=lmax)
    torch.testing.assert_close(out, rope_complex(x, torch.arange(512)[None], expected), **TOL)


def test_rope_preserves_norm(seed):
    x = rand(2, 7, 2, 16, dtype=torch.float64)
    out = reference.apply_rope(x, torch.randint(0, 10**5, (2, 7)))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_gradcheck(seed, causal):
    q = rand(2, 5, 4, 6, dtype=torch.float64).requires_grad_()
    k = rand(2, 5, 2, 6, dtype=torch.float64).requires_grad_()
    v = rand(2, 5, 2, 6, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[True] * 5, [False] * 5])  # row 1 fully masked: zero grads, not NaN

    def fn(q, k, v):
        return reference.self_attention(q, k, v, causal=causal, key_padding_mask=mask, positions=3)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    fn(q, k, v).sum().backward()
    assert (q.grad[1] == 0).all() and torch.isfinite(k.grad).all()


def test_cross_and_decode_gradcheck(seed):
    q = rand(2, 3, 4, 6, dtype=torch.float64).requires_grad_()
    k = rand(2, 7, 2, 6, dtype=torch.float64).requires_grad_()
    v = rand(2, 7, 2, 6, dtype=torch.float64).requires_grad_()
    mask = padding_mask(2, 7)
    assert torch.autograd.gradcheck(
        lambda q, k, v: reference.cross_attention(q, k, v, key_padding_mask=mask), (q, k, v))
    lens = torch.tensor([4, 7])
    assert torch.autograd.gradcheck(
        lambda q, k, v: reference.decode_attention(q, k, v, lens, scale=0.5), (q, k, v))


def test_apply_rope_gradcheck(seed):
    x = rand(1, 4, 2, 8, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: reference.apply_rope(x, 2), (x,))


def test_nan_propagates():
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64) for _ in range(3))
    k[0, 2, 0, 0] = float("nan")
    out = reference.self_attention(q, k, v, causal=False)
    assert torch.isnan(out[:, :, 0]).all()


@pytest.mark.parametrize("mode", ["causal_rope", "bidirectional_rope_positions", "cross",
                                  "ntk_masked_row"])
def test_written_out_backward_equals_autograd(seed, mode):
    """``reference.attention_backward`` (what the reference backend's training ops
    use) equals autograd through the reference forward, in float64."""
    gen = torch.Generator().manual_seed(seed)
    b, lq, hq, hkv, d = 2, 9, 6, 2, 16
    lk = 13 if mode == "cross" else lq
    q = rand(b, lq, hq, d, dtype=torch.float64, generator=gen).requires_grad_()
    k = rand(b, lk, hkv, d, dtype=torch.float64, generator=gen).requires_grad_()
    v = rand(b, lk, hkv, d, dtype=torch.float64, generator=gen).requires_grad_()
    mask = padding_mask(b, lk, generator=gen, fully_masked_row=1 if mode == "ntk_masked_row"
                        else None)
    kw = dict(key_padding_mask=mask)
    if mode == "causal_rope":
        kw.update(causal=True, rope=ops.Rope(500.0))
    elif mode == "bidirectional_rope_positions":
        kw.update(causal=False, rope=ops.Rope(), positions=torch.randint(0, 99, (b, lq),
                                                                         generator=gen))
    elif mode == "ntk_masked_row":
        kw.update(causal=True, rope=ops.Rope(100.0, 2.0, 4), positions=3)
    if mode == "cross":
        out = reference.cross_attention(q, k, v, **kw)
    else:
        out = reference.self_attention(q, k, v, **kw)
    grad_out = rand(*out.shape, dtype=torch.float64, generator=gen)
    expected = torch.autograd.grad(out, (q, k, v), grad_out)
    got = reference.attention_backward(grad_out, q.detach(), k.detach(), v.detach(), **kw)
    for name, g, e in zip("qkv", got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")
