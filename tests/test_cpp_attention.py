"""C++ CPU attention kernels vs the float64 reference, on every ISA this CPU runs.

Each test runs through the public ops with the C++ backend forced
(``backend("cpp")``) and once per ISA path (``FASTENCDEC_CPU_ISA``). Grid axes
(L, D, head pairs) are crossed; the remaining options (causal, RoPE, masks,
positions, scale, storage dtype) rotate through variants inside each test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import assert_close, padding_mask, rand
from fastencdec import ops, reference
from fastencdec.ops import dispatch
from fastencdec.ops.backends import cpp as cpp_backend

_C = pytest.importorskip("fastencdec._C")

LENGTHS = (1, 7, 64, 129, 300)
HEAD_DIMS = (32, 64, 80, 128)
HEADS = ((4, 4), (6, 3), (8, 2), (8, 1))
LOW = (torch.bfloat16, torch.float16)


@pytest.fixture
def cpp(backend):
    backend("cpp")
    assert dispatch.choose_backend("self_attention", torch.device("cpu")) == "cpp"


@pytest.fixture(autouse=True)
def threads():
    """Tests run single-threaded unless they set a count with this fixture (restored
    afterwards): on a busy machine every parallel region can wait a scheduler slice
    for its workers. Multi-threaded paths have their own tests below."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch.set_num_threads
    torch.set_num_threads(old)


def f64(*tensors):
    return [t.double() if t.is_floating_point() else t for t in tensors]


def random_mask(batch, length, gen):
    """Arbitrary (not right-padded) mask: row 0 random with >= 1 real token, row 1 all False."""
    mask = torch.rand(batch, length, generator=gen) < 0.6
    mask[0, torch.randint(0, length, (1,), generator=gen)] = True
    mask[1] = False
    return mask


def self_variants(length, head_dim, gen):
    """(name, kwargs, dtype) rotating through the options of self_attention."""
    low = LOW[head_dim // 16 % 2]
    positions = torch.randint(0, 70000, (2, length), generator=gen)  # arbitrary, large
    if head_dim in (32, 80):
        positions = positions.to(torch.int32)
    yield "bidir+rope+pad", dict(causal=False, key_padding_mask=padding_mask(
        2, length, fully_masked_row=1, generator=gen)), torch.float32
    yield "causal+rope+offset", dict(causal=True, positions=5), low
    yield "causal+norope+randmask+scale", dict(
        causal=True, rope=False, scale=0.3, key_padding_mask=random_mask(2, length, gen)
    ), torch.float32
    yield "bidir+norope+pad", dict(causal=False, rope=False, key_padding_mask=padding_mask(
        2, length, fully_masked_row=0, generator=gen)), LOW[1 - LOW.index(low)]
    yield "causal+rope+positions+pad", dict(
        causal=True, positions=positions, key_padding_mask=padding_mask(2, length, generator=gen)
    ), torch.float32


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
@pytest.mark.parametrize("length", LENGTHS)
def test_self_attention(isa, cpp, seed, length, heads, head_dim):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    for name, kwargs, dtype in self_variants(length, head_dim, gen):
        q = rand(2, length, hq, head_dim, dtype=dtype, generator=gen)
        k = rand(2, length, hkv, head_dim, dtype=dtype, generator=gen)
        v = rand(2, length, hkv, head_dim, dtype=dtype, generator=gen)
        out = ops.self_attention(q, k, v, **kwargs)
        expected = reference.self_attention(*f64(q, k, v), **kwargs)
        assert out.dtype == dtype
        assert_close(out, expected, dtype, name=f"{isa} {name} {dtype}")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
@pytest.mark.parametrize("lq,lk", [(1, 300), (7, 129), (64, 7), (129, 64), (300, 1)])
def test_cross_attention(isa, cpp, seed, lq, lk, heads, head_dim):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    for dtype, mask in ((torch.float32, True), (LOW[head_dim // 16 % 2], False)):
        q = rand(2, lq, hq, head_dim, dtype=dtype, generator=gen)
        k = rand(2, lk, hkv, head_dim, dtype=dtype, generator=gen)
        v = rand(2, lk, hkv, head_dim, dtype=dtype, generator=gen)
        kpm = padding_mask(2, lk, fully_masked_row=1, generator=gen) if mask else None
        out = ops.cross_attention(q, k, v, key_padding_mask=kpm)
        expected = reference.cross_attention(*f64(q, k, v), key_padding_mask=kpm)
        assert_close(out, expected, dtype, name=f"{isa} cross {dtype} mask={mask}")


def cache_case(batch, lmax, t_new, hq, hkv, head_dim, dtype, gen):
    """Caches, per-row lengths (0, full, random >= 1) and T new queries."""
    q = rand(batch, t_new, hq, head_dim, dtype=dtype, generator=gen)
    k_cache = rand(batch, lmax, hkv, head_dim, dtype=dtype, generator=gen)
    v_cache = rand(batch, lmax, hkv, head_dim, dtype=dtype, generator=gen)
    lens = torch.randint(1, lmax + 1, (batch,), generator=gen, dtype=torch.int32)
    lens[0], lens[1] = 0, lmax
    return q, k_cache, v_cache, lens


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
@pytest.mark.parametrize("lmax", (7, 129, 300))
def test_decode_attention(isa, cpp, seed, lmax, heads, head_dim):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    for t_new, dtype in ((1, torch.float32), (3, LOW[head_dim // 16 % 2]), (1, torch.float16)):
        q, k_cache, v_cache, lens = cache_case(4, lmax, t_new, hq, hkv, head_dim, dtype, gen)
        out = ops.decode_attention(q, k_cache, v_cache, lens)
        expected = reference.decode_attention(*f64(q, k_cache, v_cache), lens)
        assert_close(out, expected, dtype, name=f"{isa} decode T={t_new} {dtype}")


@pytest.mark.parametrize("head_dim", (32, 80, 128))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
def test_decode_attention_split_keys(isa, cpp, seed, threads, heads, head_dim):
    """Long caches and few (batch, K/V head) pairs: keys split over threads, then merged."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q, k_cache, v_cache, lens = cache_case(2, 1100, 1, hq, hkv, head_dim, torch.float32, gen)
    lens[0] = 700
    expected = reference.decode_attention(*f64(q, k_cache, v_cache), lens)
    outs = {}
    for n in (1, 2, 3):
        threads(n)
        outs[n] = ops.decode_attention(q, k_cache, v_cache, lens)
        assert_close(outs[n], expected, torch.float32, name=f"{isa} decode threads={n}")
    torch.testing.assert_close(outs[2], outs[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[3], outs[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
def test_append_kv_cache(isa, cpp, seed, heads, head_dim):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    variants = ((1, True, torch.float32), (4, True, LOW[head_dim // 16 % 2]),
                (2, False, torch.float32), (1, True, LOW[1 - head_dim // 16 % 2]))
    for t_new, rope, dtype in variants:
        batch, lmax = 3, 40
        q = rand(batch, t_new, hq, head_dim, dtype=dtype, generator=gen)
        k = rand(batch, t_new, hkv, head_dim, dtype=dtype, generator=gen)
        v = rand(batch, t_new, hkv, head_dim, dtype=dtype, generator=gen)
        k_cache = rand(batch, lmax, hkv, head_dim, dtype=dtype, generator=gen)
        v_cache = rand(batch, lmax, hkv, head_dim, dtype=dtype, generator=gen)
        lens = torch.tensor([0, lmax - t_new, 17], dtype=torch.int64)
        ref_k, ref_v = k_cache.double(), v_cache.double()
        kwargs = dict(rope=rope, rope_theta=500.0)
        q_out = ops.append_kv_cache(q, k, v, k_cache, v_cache, lens, **kwargs)
        q_ref = reference.append_kv_cache(*f64(q, k, v), ref_k, ref_v, lens, **kwargs)
        name = f"{isa} append T={t_new} rope={rope} {dtype}"
        assert q_out.dtype == dtype
        assert_close(q_out, q_ref, dtype, name=name + " q")
        assert_close(k_cache, ref_k, dtype, name=name + " k_cache")
        assert_close(v_cache, ref_v, dtype, name=name + " v_cache")
        if dtype != torch.float32:
            # Rotated values are rounded once to the storage dtype, like the reference.
            q_low = reference.append_kv_cache(q, k, v, k_cache.clone(), v_cache.clone(), lens,
                                              **kwargs)
            torch.testing.assert_close(q_out, q_low, atol=1e-5, rtol=2**-7)


def test_append_then_decode_matches_prefill(isa, cpp, seed):
    """Prefill of L tokens == decode of the last token after appending all of them."""
    gen = torch.Generator().manual_seed(seed)
    batch, length, hq, hkv, head_dim = 2, 37, 6, 3, 64
    q = rand(batch, length, hq, head_dim, generator=gen)
    k = rand(batch, length, hkv, head_dim, generator=gen)
    v = rand(batch, length, hkv, head_dim, generator=gen)
    full = ops.self_attention(q, k, v, causal=True)
    k_cache = torch.zeros(batch, 64, hkv, head_dim)
    v_cache = torch.zeros_like(k_cache)
    lens = torch.zeros(batch, dtype=torch.int64)
    for t in range(length):
        q_rot = ops.append_kv_cache(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                    k_cache, v_cache, lens)
        lens += 1
        step = ops.decode_attention(q_rot, k_cache, v_cache, lens)
        torch.testing.assert_close(step, full[:, t:t + 1], atol=2e-5, rtol=2e-5)


def test_rope_scaling_and_scale(isa, cpp, seed):
    gen = torch.Generator().manual_seed(seed)
    q = rand(2, 50, 4, 32, generator=gen)
    k = rand(2, 50, 2, 32, generator=gen)
    v = rand(2, 50, 2, 32, generator=gen)
    kwargs = dict(causal=True, positions=torch.tensor(30), rope_theta=1000.0,
                  rope_scaling_factor=4.0, max_position_embeddings=16, scale=0.05)
    out = ops.self_attention(q, k, v, **kwargs)
    assert_close(out, reference.self_attention(*f64(q, k, v), **kwargs), torch.float32)


def test_multithreaded_equals_single(isa, cpp, seed, threads):
    gen = torch.Generator().manual_seed(seed)
    q = rand(2, 300, 8, 64, generator=gen)
    k = rand(2, 300, 2, 64, generator=gen)
    v = rand(2, 300, 2, 64, generator=gen)
    mask = padding_mask(2, 300, generator=gen)
    q1 = rand(1, 1, 6, 64, generator=gen)  # 3 K/V heads on 2 threads: keys get split
    kc, vc = rand(1, 1500, 3, 64, generator=gen), rand(1, 1500, 3, 64, generator=gen)
    lens = torch.tensor([1400])
    results = []
    for n in (1, 2):
        threads(n)
        results.append((
            ops.self_attention(q, k, v, causal=True, key_padding_mask=mask),
            ops.self_attention(q, k, v, causal=False),
            ops.cross_attention(q, k, v, key_padding_mask=mask),
            ops.decode_attention(q1, kc, vc, lens),
        ))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_nan_propagates(isa, cpp, seed):
    q = torch.randn(2, 70, 4, 32)
    k = torch.randn(2, 70, 2, 32)
    v = torch.randn(2, 70, 2, 32)
    q[0, 3, 1, 5] = float("nan")
    k[1, 10, 0, 0] = float("nan")
    mask = torch.ones(2, 70, dtype=torch.bool)
    out = ops.self_attention(q, k, v, causal=True, key_padding_mask=mask)
    assert out[0, 3, 1].isnan().all()  # the NaN query row
    assert out[1, 10:, :2].isnan().all()  # queries that see the NaN key (heads of K/V head 0)
    assert out[1, :10].isfinite().all() and out[1, :, 2:].isfinite().all()
    assert out[0, :3].isfinite().all() and out[0, 4:].isfinite().all()
    # A NaN key that is masked out is never read.
    mask[1, 10] = False
    assert ops.self_attention(q, k, v, causal=True, key_padding_mask=mask)[1].isfinite().all()
    # Decode: NaN in a visible cache row.
    kc, vc = torch.randn(2, 50, 2, 32), torch.randn(2, 50, 2, 32)
    vc[0, 7, 1, 3] = float("nan")
    lens = torch.tensor([50, 7])
    dec = ops.decode_attention(torch.randn(2, 1, 4, 32), kc, vc, lens)
    assert dec[0, 0, 2:, 3].isnan().all() and dec[0, 0, 2:, :3].isfinite().all()
    assert dec[0, 0, :2].isfinite().all()
    assert dec[1].isfinite().all()  # row 1 does not see key 7


def test_fully_masked_rows_are_zero(isa, cpp, seed):
    q, k, v = torch.randn(2, 9, 4, 32), torch.randn(2, 9, 4, 32), torch.randn(2, 9, 4, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 4] = True
    out = ops.self_attention(q, k, v, causal=True, key_padding_mask=mask)
    assert (out[1] == 0).all() and (out[0, :4] == 0).all() and out[0, 4:].abs().sum() > 0
    out = ops.cross_attention(q[:, :1], k, v, key_padding_mask=mask)
    assert (out[1] == 0).all()
    lens = torch.tensor([0, 2])
    dec = ops.decode_attention(q[:, :3], k, v, lens)  # T=3 > len: early queries see nothing
    assert (dec[0] == 0).all() and (dec[1, 0] == 0).all() and dec[1, 1:].abs().sum() > 0


def test_noncontiguous_inputs(isa, cpp, seed):
    gen = torch.Generator().manual_seed(seed)
    q = rand(2, 20, 32, 4, generator=gen).transpose(2, 3)  # [2, 20, 4, 32], strided
    kv = rand(2, 20, 2, 2, 32, generator=gen)
    k, v = kv[:, :, 0], kv[:, :, 1]
    out = ops.self_attention(q, k, v, causal=True)
    assert_close(out, reference.self_attention(*f64(q, k, v), causal=True), torch.float32)


def test_dispatch_uses_cpp(cpp):
    for op in ("self_attention", "cross_attention", "decode_attention", "append_kv_cache",
               "apply_rope"):
        name, kernel = dispatch.resolve(op, "cpu")
        assert name == "cpp" and kernel is cpp_backend.KERNELS[op]


def test_float64_falls_back_to_reference(cpp, monkeypatch, seed):
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 5, 1, 8, dtype=torch.float64)
    v = torch.randn(1, 5, 1, 8, dtype=torch.float64)
    assert cpp_backend.KERNELS["self_attention"].unsupported(q, k, v) is not None
    monkeypatch.setattr(dispatch, "_warned", set())  # the fallback warns once per process
    with pytest.warns(UserWarning, match="reference"):
        out = ops.self_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, reference.self_attention(q, k, v, causal=True))


def test_noncontiguous_cache_append_falls_back(cpp, monkeypatch, seed):
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    big = torch.zeros(1, 10, 2, 8)
    k_cache, v_cache = big[:, :, :1], big[:, :, 1:]
    assert cpp_backend.KERNELS["append_kv_cache"].unsupported(
        q, k, v, k_cache, v_cache, torch.tensor([3]), None) is not None
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="non-contiguous"):
        ops.append_kv_cache(q, k, v, k_cache, v_cache, torch.tensor([3]), rope=False)
    torch.testing.assert_close(big[0, 3, 0], k[0, 0, 0])


# ---- bad inputs straight to _C raise Python errors ---------------------------

def _arrays(b=1, length=4, hq=2, hkv=1, d=8, lmax=6):
    f = np.float32
    return dict(
        q=np.zeros((b, length, hq, d), f), k=np.zeros((b, length, hkv, d), f),
        v=np.zeros((b, length, hkv, d), f), out=np.zeros((b, length, hq, d), f),
        kc=np.zeros((b, lmax, hkv, d), f), vc=np.zeros((b, lmax, hkv, d), f),
    )


def _self(a, **over):
    args = dict(q=a["q"], k=a["k"], v=a["v"], out=a["out"], key_padding_mask=None,
                positions=None, causal=True, scale=0.5, rope_base=10000.0,
                storage="float32", num_threads=1)
    args.update(over)
    return _C.self_attention(**args)


def test_c_bad_inputs_raise():
    a = _arrays()
    _self(a)  # the valid call works
    _self(a, positions=np.zeros((1, 4), np.int32))  # int32 positions are fine
    bad_self = [
        (ValueError, dict(q=np.asfortranarray(a["q"]))),  # not C-contiguous
        (ValueError, dict(k=np.zeros((1, 8, 1, 8), np.float32)[:, ::2])),  # strided view
        (TypeError, dict(q=a["q"].astype(np.float64))),  # wrong dtype
        (TypeError, dict(q=a["q"].astype(np.float16))),  # fp16 must come as uint16 bits
        (TypeError, dict(storage="bfloat16")),  # float32 arrays but bf16 storage
        (ValueError, dict(storage="int8")),
        (ValueError, dict(k=np.zeros((1, 4, 1, 4), np.float32))),  # head_dim mismatch
        (ValueError, dict(k=np.zeros((1, 5, 1, 8), np.float32))),  # self-attn length mismatch
        (ValueError, dict(out=np.zeros((1, 4, 2, 4), np.float32))),  # out shape
        (ValueError, dict(q=np.zeros((1, 4, 3, 8), np.float32),
                          out=np.zeros((1, 4, 3, 8), np.float32), k=np.zeros((1, 4, 2, 8),
                                                                             np.float32),
                          v=np.zeros((1, 4, 2, 8), np.float32))),  # 3 % 2 heads
        (ValueError, dict(q=np.zeros((4, 2, 8), np.float32))),  # 3-D
        (TypeError, dict(q=np.zeros((4, 2, 8)))),  # 3-D float64: dtype is checked first
        (ValueError, dict(key_padding_mask=np.ones((1, 5), bool))),
        (TypeError, dict(key_padding_mask=np.ones((1, 4), np.int8))),
        (TypeError, dict(key_padding_mask=[[True] * 4])),  # not an array
        (ValueError, dict(positions=np.zeros((2, 4), np.int64))),  # batch 1 only
        (TypeError, dict(positions=np.zeros((1, 4), np.int16))),
        (TypeError, dict(positions=np.zeros((1, 4), np.float32))),
        (ValueError, dict(positions=np.zeros((1, 4), np.int64), rope_base=-1.0)),
        (ValueError, dict(scale=float("nan"))),
        (ValueError, dict(num_threads=0)),
    ]
    for error, over in bad_self:
        with pytest.raises(error):
            _self(a, **over)
    ro = a["out"].copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _self(a, out=ro)
    odd = _arrays(d=7)
    with pytest.raises(ValueError, match="even"):
        _self(odd, positions=np.zeros((1, 4), np.int64))

    lens = np.array([3], np.int64)
    _C.decode_attention(a["q"], a["kc"], a["vc"], lens, None, a["out"], 0.5, "float32", 1)
    for bad_lens in (np.array([7], np.int64), np.array([-1], np.int64), np.array([3, 3], np.int64)):
        with pytest.raises(ValueError):
            _C.decode_attention(a["q"], a["kc"], a["vc"], bad_lens, None, a["out"], 0.5, "float32",
                                1)
    _C.decode_attention(a["q"], a["kc"], a["vc"], lens.astype(np.int32), None, a["out"], 0.5,
                        "float32", 1)  # int32 lengths are fine
    with pytest.raises(TypeError):
        _C.decode_attention(a["q"], a["kc"], a["vc"], lens.astype(np.uint8), None, a["out"],
                            0.5, "float32", 1)
    with pytest.raises(ValueError):  # int32 values are range-checked too
        _C.decode_attention(a["q"], a["kc"], a["vc"], np.array([9], np.int32), None, a["out"],
                            0.5, "float32", 1)
    with pytest.raises(ValueError, match="key_padding_mask"):  # mask of the wrong shape
        _C.decode_attention(a["q"], a["kc"], a["vc"], lens, np.ones((1, 5), bool), a["out"],
                            0.5, "float32", 1)
    with pytest.raises(ValueError):
        _C.cross_attention(a["q"], a["kc"], a["vc"][:, :5].copy(), a["out"], None, 0.5,
                           "float32", 1)

    q1 = a["q"][:, :2].copy()
    args = [q1, a["k"][:, :2].copy(), a["v"][:, :2].copy(), a["kc"], a["vc"]]
    _C.append_kv_cache(*args, np.array([4], np.int64), q1.copy(), True, 100.0, "float32", 1)
    with pytest.raises(ValueError, match="cache"):  # 5 + 2 new tokens > 6
        _C.append_kv_cache(*args, np.array([5], np.int64), q1.copy(), True, 100.0, "float32", 1)
    with pytest.raises(ValueError, match="q_out"):
        _C.append_kv_cache(*args, np.array([0], np.int64), None, True, 100.0, "float32", 1)
    ro_cache = a["kc"].copy()
    ro_cache.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _C.append_kv_cache(q1, args[1], args[2], ro_cache, a["vc"], np.array([0], np.int64),
                           None, False, 100.0, "float32", 1)


def test_bf16_storage_views(seed):
    """bf16/fp16 arrive as uint16 bit views; outputs are written in that dtype."""
    q = torch.randn(1, 3, 2, 16, dtype=torch.bfloat16)
    k, v = torch.randn(1, 3, 1, 16, dtype=torch.bfloat16), torch.randn(1, 3, 1, 16,
                                                                      dtype=torch.bfloat16)
    out = torch.empty_like(q)
    _C.cross_attention(*(t.view(torch.uint16).numpy() for t in (q, k, v, out)), None, 0.25,
                       "bfloat16", 1)
    expected = reference.cross_attention(*f64(q, k, v), scale=0.25)
    assert_close(out, expected, torch.bfloat16)
