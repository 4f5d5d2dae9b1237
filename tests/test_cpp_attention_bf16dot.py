"""The C++ prefill attention's bf16_dot mode (q, k after RoPE, v and the softmax
probabilities rounded to bf16, fp32 sums; the int8/bf16 encoders use it) against the
float64 reference, on every ISA path: AVX512_BF16 pairs (vdpbf16ps) and the rounded
operands through fp32 products elsewhere (other ISAs, or FASTENCDEC_CPU_BF16DOT=0)."""

from __future__ import annotations

import pytest
import torch

from _helpers import padding_mask, rand
from fastencdec import reference
from fastencdec.spec import Rope

_C = pytest.importorskip("fastencdec._C")

STORAGE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Rounding q, k, v and P to bf16 (8 bits of mantissa) moves an output by up to ~2^-8 of
# the values it averages; inputs of storage dtype bf16 were rounded already.
ATOL, RTOL = 3e-2, 3e-2


def _bits(t):
    return t.numpy() if t.dtype is torch.float32 else t.view(torch.uint16).numpy()


def run(q, k, v, mask, positions, causal, scale, bf16_dot, threads=1, base=10000.0):
    out = torch.full_like(q, float("nan"))  # an element left unwritten fails
    _C.self_attention(_bits(q), _bits(k), _bits(v), _bits(out),
                      None if mask is None else mask.numpy(),
                      None if positions is None else positions.numpy(), causal, scale, base,
                      STORAGE[q.dtype], threads, bf16_dot)
    return out


def expected(q, k, v, mask, positions, causal, scale, base=10000.0):
    rope = Rope(base) if positions is not None else False
    return reference.self_attention(q.double(), k.double(), v.double(), causal=causal,
                                    key_padding_mask=mask, positions=positions, rope=rope,
                                    scale=scale)


def cases(gen):
    """(L, D, Hq, Hkv, causal, rope, storage dtype, mask kind)."""
    yield 512, 64, 6, 3, False, True, torch.float32, "none"       # the mu-330m encoder
    yield 300, 64, 8, 2, True, True, torch.bfloat16, "pad"
    yield 129, 80, 4, 4, False, True, torch.float32, "random"      # odd tile, fully masked row
    yield 65, 32, 8, 1, True, True, torch.float16, "random"
    yield 7, 34, 6, 3, False, True, torch.float32, "pad"           # 17 pairs per row
    yield 77, 33, 3, 1, True, False, torch.float32, "pad"          # odd head_dim (no RoPE)
    yield 1, 64, 4, 2, True, True, torch.bfloat16, "none"
    length = int(torch.randint(2, 200, (1,), generator=gen))
    yield length, 48, 6, 2, bool(length % 2), True, torch.float32, "random"


@pytest.fixture(params=["pairs", "rounded"])
def bf16_path(request, isa, monkeypatch):
    """AVX512_BF16 pairs where this CPU has them, else (and on request) rounded operands."""
    if request.param == "rounded":
        monkeypatch.setenv("FASTENCDEC_CPU_BF16DOT", "0")
        _C.reset_isa()
    yield request.param
    monkeypatch.delenv("FASTENCDEC_CPU_BF16DOT", raising=False)
    _C.reset_isa()


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_dot_against_the_reference(bf16_path, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    for length, dim, hq, hkv, causal, rope, dtype, mask_kind in cases(gen):
        batch = 2
        q = rand(batch, length, hq, dim, dtype=dtype, generator=gen)
        k = rand(batch, length, hkv, dim, dtype=dtype, generator=gen)
        v = rand(batch, length, hkv, dim, dtype=dtype, generator=gen)
        mask = None
        if mask_kind == "pad":
            mask = padding_mask(batch, length, generator=gen)
        elif mask_kind == "random":
            mask = torch.rand(batch, length, generator=gen) < 0.6
            mask[1] = False  # a row with no visible key: zeros
        positions = (torch.randint(0, 5000, (batch, length), generator=gen) if rope
                     else None)
        scale = dim ** -0.5
        got = run(q, k, v, mask, positions, causal, scale, True, threads)
        want = expected(q, k, v, mask, positions, causal, scale)
        name = f"L={length} D={dim} {hq}/{hkv} causal={causal} {dtype} {mask_kind}"
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"{n}: {m}")
        if mask_kind == "random":
            assert (got[1] == 0).all(), f"{name}: a query with no visible key is not 0"
        # fp32 products are ~100x closer: the mode really rounds
        exact = run(q, k, v, mask, positions, causal, scale, False, threads)
        if dtype is torch.float32 and length >= 64:
            assert (exact.double() - want).abs().max() < (got.double() - want).abs().max()


def test_rows_are_independent_of_the_batch(seed):
    """Each batch row's output equals that row run alone (the serving guarantee)."""
    gen = torch.Generator().manual_seed(seed)
    q = rand(3, 150, 6, 64, generator=gen)
    k = rand(3, 150, 3, 64, generator=gen)
    v = rand(3, 150, 3, 64, generator=gen)
    mask = padding_mask(3, 150, generator=gen)
    pos = torch.randint(0, 300, (3, 150), generator=gen)
    batched = run(q, k, v, mask, pos, False, 0.125, True, threads=2)
    for b in range(3):
        alone = run(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b:b + 1], pos[b:b + 1], False,
                    0.125, True, threads=1)
        assert torch.equal(batched[b:b + 1], alone)


def test_invisible_keys_never_reach_the_output(seed):
    """Padded keys hold inf and NaN values: outputs stay finite (padded keys are dropped
    from the packed tiles, not multiplied by 0)."""
    gen = torch.Generator().manual_seed(seed)
    length = 131
    q = rand(1, length, 4, 32, generator=gen)
    k = rand(1, length, 2, 32, generator=gen)
    v = rand(1, length, 2, 32, generator=gen)
    mask = torch.ones(1, length, dtype=torch.bool)
    mask[0, 40:45] = False
    k[0, 40:45] = float("nan")
    v[0, 40:45] = float("inf")
    for causal in (False, True):
        got = run(q, k, v, mask, None, causal, 0.2, True)
        assert torch.isfinite(got).all()
        want = expected(q.nan_to_num(0, 0, 0), k.nan_to_num(0, 0, 0), v.nan_to_num(0, 0, 0),
                        mask, None, causal, 0.2)
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)
