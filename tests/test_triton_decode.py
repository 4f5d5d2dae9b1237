"""Triton decode kernels (decode_attention in cache and cross mode, append_kv_cache)
against the float64 reference. CPU runs use Triton's interpreter.

Every allocation made by ``torch.empty``/``empty_like`` during a test is filled with
NaN, and unused cache rows hold NaN, so an unwritten output or a key read past a
row's length shows up as NaN. Shapes follow a pairwise grid, not a full product.
"""

from __future__ import annotations

import os

import pytest
import torch
from fastencdec.kernels import append_kv_cache as append_kernel
from fastencdec.kernels import decode_attention as decode_kernel

import fastencdec.ops as ops
import fastencdec.reference as ref
from _helpers import assert_close, padding_mask, rand
from fastencdec.ops import dispatch
from fastencdec.ops.backends import triton as tb
from fastencdec.ops.backends.triton import SPLITS_ENV_VAR

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def splits(monkeypatch):
    """Force the number of key splits (None = the heuristic)."""

    def force(n):
        if n is None:
            monkeypatch.delenv(SPLITS_ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(SPLITS_ENV_VAR, str(n))

    return force


def _cache(batch, lmax, n_kv, head_dim, lens, dtype, device=DEVICE):
    """Random cache whose rows at or past each row's length are NaN; returns the
    poisoned cache and a clean float64 copy (zeros there) for the reference."""
    kc = rand(batch, lmax, n_kv, head_dim, dtype=dtype, device=device)
    used = torch.arange(lmax, device=device)[None, :] < lens.to(device)[:, None]
    clean = torch.where(used[:, :, None, None], kc.double(), 0.0)
    return kc.masked_fill(~used[:, :, None, None], float("nan")), clean


# (cache length L, head_dim, (Hq, Hkv), T, splits, dtype): every pair of values of
# any two parameters appears at least once; D 96 and 256 once each. splits None =
# the heuristic. Rows have lengths [L, 0, Lmax] with Lmax = L + 9 (a full cache), so
# every case has an empty row and a row with unused (NaN) cache rows.
F32, F16 = torch.float32, torch.float16
DECODE_CASES = [
    (1, 32, (8, 2), 1, None, F16),
    (1, 64, (4, 4), 3, 4, F32),
    (1, 80, (8, 1), 3, 1, F16),
    (1, 128, (6, 3), 1, 1, F32),
    (7, 32, (6, 3), 3, None, F32),
    (7, 64, (8, 1), 1, 4, F16),
    (7, 80, (4, 4), 1, 1, F32),
    (7, 128, (8, 2), 3, 4, F16),
    (64, 32, (4, 4), 3, 4, F16),
    (64, 64, (8, 2), 1, 1, F32),
    (64, 80, (6, 3), 1, None, F16),
    (64, 128, (8, 1), 1, None, F32),
    (129, 32, (8, 1), 1, 1, F32),
    (129, 64, (6, 3), 3, None, F16),
    (129, 80, (8, 2), 1, 4, F32),
    (129, 128, (4, 4), 3, None, F16),
    (300, 32, (6, 3), 3, 4, F32),
    (300, 64, (4, 4), 1, 1, F16),
    (300, 80, (8, 1), 1, None, F32),
    (300, 128, (8, 2), 3, 1, F32),
    (64, 96, (6, 3), 3, 3, F32),
    (129, 256, (8, 2), 1, 3, F16),
]


@pytest.mark.parametrize("length,head_dim,heads,t_new,n_splits,dtype", DECODE_CASES)
def test_decode_attention(backend, splits, poison_alloc, seed,
                          length, head_dim, heads, t_new, n_splits, dtype):
    backend("triton")
    splits(n_splits)
    n_q, n_kv = heads
    lmax = length + 9
    lens = torch.tensor([length, 0, lmax], device=DEVICE)
    q = rand(3, t_new, n_q, head_dim, dtype=dtype, device=DEVICE)
    kc, kc_ref = _cache(3, lmax, n_kv, head_dim, lens, dtype)
    vc, vc_ref = _cache(3, lmax, n_kv, head_dim, lens, dtype)
    out = ops.decode_attention(q, kc, vc, lens)
    expected = ref.decode_attention(q.double(), kc_ref, vc_ref, lens)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    assert (out[1] == 0).all()  # empty row


@pytest.mark.parametrize("n_splits", [1, 3])
def test_decode_attention_with_key_mask(backend, splits, poison_alloc, seed, n_splits):
    """Cache mode with a key mask too (generated pad tokens are masked keys)."""
    backend("triton")
    splits(n_splits)
    lens = torch.tensor([30, 1, 64], device=DEVICE)
    q = rand(3, 2, 6, 64, device=DEVICE)
    kc, kc_ref = _cache(3, 64, 3, 64, lens, torch.float32)
    vc, vc_ref = _cache(3, 64, 3, 64, lens, torch.float32)
    mask = torch.rand(3, 64, device=DEVICE) < 0.7
    mask[1] = False  # a row whose only key is masked
    out = ops.decode_attention(q, kc, vc, lens, key_padding_mask=mask)
    expected = ref.decode_attention(q.double(), kc_ref, vc_ref, lens, key_padding_mask=mask)
    assert_close(out, expected, torch.float32)
    assert (out[1] == 0).all()


def test_decode_attention_scale_and_int32_lengths(backend, splits, poison_alloc, seed):
    backend("triton")
    splits(2)
    lens = torch.tensor([5, 40], dtype=torch.int32)
    q = rand(2, 2, 4, 64)
    kc, kc_ref = _cache(2, 40, 2, 64, lens, torch.float32)
    vc, vc_ref = _cache(2, 40, 2, 64, lens, torch.float32)
    out = ops.decode_attention(q, kc, vc, lens, scale=0.3)
    expected = ref.decode_attention(q.double(), kc_ref, vc_ref, lens, scale=0.3)
    assert_close(out, expected, torch.float32)


def test_decode_splits_past_row_end_do_nothing(seed):
    """Many splits, short rows: splits with no key must merge to exactly the one-split result."""
    lens = torch.tensor([3, 0, 70])
    q = rand(3, 1, 4, 32)
    kc, _ = _cache(3, 256, 2, 32, lens, torch.float32)
    vc, _ = _cache(3, 256, 2, 32, lens, torch.float32)
    one = decode_kernel.decode_attention(q, kc, vc, seqlens=lens, num_splits=1,
                                          sm_count=8)
    many = decode_kernel.decode_attention(q, kc, vc, seqlens=lens, num_splits=8,
                                          sm_count=8)
    assert torch.isfinite(many).all()
    torch.testing.assert_close(many, one, atol=2e-6, rtol=2e-6)


def test_decode_bad_lengths_stay_in_bounds(seed):
    """Lengths outside [0, Lmax] (validation skipped, e.g. under graph capture) are
    clamped: nothing past the cache is read. The caches are views of NaN buffers."""
    lmax, over = 20, 12
    big_k = torch.full((2, lmax + over, 2, 32), float("nan"))
    big_v = big_k.clone()
    big_k[:, :lmax] = rand(2, lmax, 2, 32)
    big_v[:, :lmax] = rand(2, lmax, 2, 32)
    kc, vc = big_k[:, :lmax], big_v[:, :lmax]
    q = rand(2, 1, 4, 32)
    for n in (1, 3):
        out = decode_kernel.decode_attention(q, kc, vc, seqlens=torch.tensor([lmax + 7, -4]), num_splits=n,
                                          sm_count=8)
        expected = ref.decode_attention(q.double(), kc.double(), vc.double(), torch.tensor([lmax, 0]))
        assert_close(out, expected, torch.float32)


def test_decode_nan_query_propagates(seed):
    lens = torch.tensor([9, 9])
    q = rand(2, 1, 4, 32)
    q[0, 0, 1, 3] = float("nan")
    kc, _ = _cache(2, 9, 2, 32, lens, torch.float32)
    vc, _ = _cache(2, 9, 2, 32, lens, torch.float32)
    for n in (1, 2):
        out = decode_kernel.decode_attention(q, kc, vc, seqlens=lens, num_splits=n, sm_count=8)
        assert out[0, 0, 1].isnan().all()
        assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, 0, 2:]).all()


# (Lq, Lk, head_dim, (Hq, Hkv), splits, dtype, mask?)
CROSS_CASES = [
    (1, 37, 64, (6, 3), 1, torch.float32, True),
    (3, 129, 32, (8, 2), 4, torch.float16, True),
    (16, 50, 80, (8, 1), 3, torch.float32, True),
    (2, 300, 128, (4, 4), None, torch.float16, False),
]


@pytest.mark.parametrize("lq,lk,head_dim,heads,n_splits,dtype,masked", CROSS_CASES)
def test_cross_attention_decode(poison_alloc, seed, lq, lk, head_dim, heads, n_splits, dtype,
                                masked):
    n_q, n_kv = heads
    q = rand(3, lq, n_q, head_dim, dtype=dtype, device=DEVICE)
    k = rand(3, lk, n_kv, head_dim, dtype=dtype, device=DEVICE)
    v = rand(3, lk, n_kv, head_dim, dtype=dtype, device=DEVICE)
    mask = padding_mask(3, lk, fully_masked_row=1, device=DEVICE) if masked else None
    out = decode_kernel.decode_attention(q, k, v, key_mask=mask, num_splits=n_splits,
                                        sm_count=8)
    expected = ref.cross_attention(q.double(), k.double(), v.double(), key_padding_mask=mask)
    assert_close(out, expected, dtype)
    if masked:
        assert (out[1] == 0).all()


def test_cross_attention_rejects_unsupported_head_dim():
    q, k = rand(1, 1, 2, 48), rand(1, 5, 2, 48)
    assert "head_dim 48" in tb.KERNELS["cross_attention"].unsupported(q, k, k, None, 0.1)


# (T, head_dim, (Hq, Hkv), rope, dtype). Rows start at [0, 5, Lmax - T] (the last
# append fills the cache exactly).
APPEND_CASES = [
    (1, 64, (6, 3), True, torch.float32),
    (3, 80, (8, 2), True, torch.float16),
    (3, 32, (4, 4), False, torch.float32),
    (2, 256, (8, 1), True, torch.float32),
    (1, 128, (4, 2), False, torch.float16),
]


def _check_append(q, k, v, starts, lmax, dtype, **rope_kw):
    batch, t_new, n_kv, head_dim = k.shape
    kc = torch.full((batch, lmax, n_kv, head_dim), float("nan"), dtype=dtype, device=q.device)
    vc = kc.clone()
    kc_ref, vc_ref = kc.double(), vc.double()
    q_rot = ops.append_kv_cache(q, k, v, kc, vc, starts, **rope_kw)
    q_ref = ref.append_kv_cache(q.double(), k.double(), v.double(), kc_ref, vc_ref, starts, **rope_kw)
    assert q_rot.dtype == dtype
    assert_close(q_rot, q_ref, dtype, name="q_rot")
    # Written rows match; every other row is still NaN.
    for name, got, want in (("k_cache", kc, kc_ref), ("v_cache", vc, vc_ref)):
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: rows written where they should not"
        assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0), dtype, name=name)


@pytest.mark.parametrize("t_new,head_dim,heads,rope,dtype", APPEND_CASES)
def test_append_kv_cache(backend, seed, t_new, head_dim, heads, rope, dtype):
    backend("triton")
    n_q, n_kv = heads
    lmax = 40
    starts = torch.tensor([0, 5, lmax - t_new], device=DEVICE)
    q = rand(3, t_new, n_q, head_dim, dtype=dtype, device=DEVICE)
    k = rand(3, t_new, n_kv, head_dim, dtype=dtype, device=DEVICE)
    v = rand(3, t_new, n_kv, head_dim, dtype=dtype, device=DEVICE)
    _check_append(q, k, v, starts, lmax, dtype, rope=rope, rope_theta=500.0)


@pytest.mark.parametrize("lmax", [30, 300])
def test_append_kv_cache_ntk_scaling(backend, seed, lmax):
    """Dynamic NTK: lmax 30 <= max_pos needs no host sync; lmax 300 > max_pos reads
    max(cache_seqlens) like the reference. Positions up to ~300 check angle precision."""
    backend("triton")
    starts = torch.tensor([lmax - 2, 3])
    q, k, v = rand(2, 2, 4, 64), rand(2, 2, 2, 64), rand(2, 2, 2, 64)
    _check_append(q, k, v, starts, lmax, torch.float32,
                  rope_scaling_factor=2.0, max_position_embeddings=64)


def test_append_kv_cache_long_positions(seed):
    """Angles at position ~1e5 (fp32 products would be off by ~1e-2 rad)."""
    starts = torch.tensor([100_000, 65_535])
    q, k, v = rand(2, 1, 2, 32), rand(2, 1, 2, 32), rand(2, 1, 2, 32)
    # q is rotated even though the rows fall outside this small cache (nothing is written).
    turns = tb._turns_per_position(q.device, 32, 10000.0)
    q_rot = append_kernel.append_kv_cache(q, k, v, torch.zeros(2, 4, 2, 32),
                                          torch.zeros(2, 4, 2, 32), starts, turns)
    positions = starts[:, None]
    assert_close(q_rot, ref.apply_rope(q.double(), positions), torch.float32)


def test_append_bad_lengths_never_write_past_cache(seed):
    lmax, over = 10, 6
    big_k = torch.full((2, lmax + over, 2, 32), float("nan"))
    big_v = big_k.clone()
    q, k, v = rand(2, 3, 2, 32), rand(2, 3, 2, 32), rand(2, 3, 2, 32)
    append_kernel.append_kv_cache(q, k, v, big_k[:, :lmax], big_v[:, :lmax],
                                  torch.tensor([lmax - 1, lmax + 2]),
                                  tb._turns_per_position(q.device, 32, 10000.0))
    assert big_k[:, lmax:].isnan().all() and big_v[:, lmax:].isnan().all()
    assert torch.isfinite(big_k[0, lmax - 1]).all()  # the one row that fits was written


def test_append_then_decode_matches_self_attention(backend, splits, poison_alloc, seed):
    """Prefill rows by the reference, then two decode steps (T=3, then T=1) through
    append + decode; the outputs equal causal RoPE self-attention on the whole sequence."""
    backend("triton")
    splits(3)
    n_q, n_kv, head_dim, lmax = 6, 3, 64, 48
    prefix = torch.tensor([0, 11, 40])
    steps = (3, 1)
    total = prefix + sum(steps)
    q_all = rand(3, lmax, n_q, head_dim)
    k_all = rand(3, lmax, n_kv, head_dim)
    v_all = rand(3, lmax, n_kv, head_dim)
    kc = torch.full((3, lmax, n_kv, head_dim), float("nan"))
    vc = kc.clone()
    for b, p in enumerate(prefix.tolist()):
        kc[b, :p] = ref.apply_rope(k_all[b : b + 1, :p], 0)[0]
        vc[b, :p] = v_all[b, :p]
    lens = prefix.clone()
    outs = []
    for t_new in steps:
        rows = (torch.arange(3)[:, None], lens[:, None] + torch.arange(t_new)[None, :])
        q_rot = ops.append_kv_cache(q_all[rows], k_all[rows], v_all[rows], kc, vc, lens)
        lens = lens + t_new
        outs.append(ops.decode_attention(q_rot, kc, vc, lens))
    out = torch.cat(outs, dim=1)
    for b, n in enumerate(total.tolist()):
        full = ref.self_attention(q_all[b : b + 1, :n].double(), k_all[b : b + 1, :n].double(),
                                  v_all[b : b + 1, :n].double(), causal=True)
        assert_close(out[b : b + 1], full[:, n - sum(steps) :], torch.float32, name=f"row {b}")


def test_unsupported_head_dim_falls_back(backend, monkeypatch, seed):
    backend("triton")
    monkeypatch.setattr(dispatch, "_warned", set())  # the warning is once per process
    lens = torch.tensor([4])
    q, kc, vc = rand(1, 1, 2, 48), rand(1, 6, 1, 48), rand(1, 6, 1, 48)
    assert tb.KERNELS["decode_attention"].unsupported(q, kc, vc, lens, None, 0.1)
    with pytest.warns(UserWarning, match="head_dim 48"):
        out = ops.decode_attention(q, kc, vc, lens)
    assert_close(out, ref.decode_attention(q.double(), kc.double(), vc.double(), lens),
                 torch.float32)


# ---- GPU only: bf16, long caches, CUDA graphs ---------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("mode", ["cache", "cross"])
def test_decode_bf16_long(backend, poison_alloc, seed, batch, mode):
    backend("triton")
    dtype, lk, n_q, n_kv, head_dim = torch.bfloat16, 8192, 16, 4, 128
    q = rand(batch, 1, n_q, head_dim, dtype=dtype, device="cuda")
    if mode == "cache":
        lens = torch.randint(1, lk + 1, (batch,), device="cuda")
        lens[0] = lk
        kc, kc_ref = _cache(batch, lk, n_kv, head_dim, lens, dtype, device="cuda")
        vc, vc_ref = _cache(batch, lk, n_kv, head_dim, lens, dtype, device="cuda")
        out = ops.decode_attention(q, kc, vc, lens)
        expected = ref.decode_attention(q.double(), kc_ref, vc_ref, lens)
    else:
        k = rand(batch, lk, n_kv, head_dim, dtype=dtype, device="cuda")
        v = rand(batch, lk, n_kv, head_dim, dtype=dtype, device="cuda")
        mask = padding_mask(batch, lk, device="cuda")
        out = decode_kernel.decode_attention(q, k, v, key_mask=mask, sm_count=132)
        expected = ref.cross_attention(q.double(), k.double(), v.double(), key_padding_mask=mask)
    assert_close(out, expected, dtype)


@pytest.mark.gpu
def test_decode_step_cuda_graph(backend, seed):
    """append + decode captured once, replayed with new lengths and inputs."""
    backend("triton")
    dtype, batch, lmax, n_q, n_kv, head_dim = torch.bfloat16, 4, 1024, 16, 4, 64
    q = rand(batch, 1, n_q, head_dim, dtype=dtype, device="cuda")
    k = rand(batch, 1, n_kv, head_dim, dtype=dtype, device="cuda")
    v = rand(batch, 1, n_kv, head_dim, dtype=dtype, device="cuda")
    kc = rand(batch, lmax, n_kv, head_dim, dtype=dtype, device="cuda")
    vc = rand(batch, lmax, n_kv, head_dim, dtype=dtype, device="cuda")
    lens = torch.tensor([0, 5, 700, lmax - 1], device="cuda")

    def step():
        q_rot = ops.append_kv_cache(q, k, v, kc, vc, lens)
        return ops.decode_attention(q_rot, kc, vc, lens + 1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles the kernels and builds the RoPE table
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    lens.copy_(torch.tensor([3, 17, 900, 100], device="cuda"))
    q.copy_(rand(batch, 1, n_q, head_dim, dtype=dtype, device="cuda"))
    graph.replay()
    kc_ref, vc_ref = kc.double(), vc.double()
    q_rot = ref.append_kv_cache(q.double(), k.double(), v.double(), kc_ref, vc_ref, lens)
    expected = ref.decode_attention(q_rot, kc_ref, vc_ref, lens + 1)
    assert_close(out, expected, dtype)


# ---- split heuristic ------------------------------------------------------------------


@pytest.mark.parametrize("programs,key_len,sm_count", [
    (8, 8192, 132), (32, 8192, 132), (4, 2048, 132), (106, 65536, 132), (3, 300, 8),
    (200, 8192, 132), (4, 256, 132), (24, 4096, 108)])
def test_split_heuristic_is_flash_attentions(programs, key_len, sm_count):
    """No split past 80% of the SMs or within 4 key tiles; otherwise the smallest
    eligible split count within 85% of the best wave efficiency."""
    block_n = 64
    n = decode_kernel.choose_num_splits(programs, key_len, block_n, sm_count)
    blocks = -(-key_len // block_n)
    if programs >= 0.8 * sm_count or blocks <= 4:
        assert n == 1
        return

    def eff(s):
        waves = programs * s / sm_count
        return waves / -(-waves // 1)

    def eligible(s):
        return s == 1 or -(-blocks // s) != -(-blocks // (s - 1))

    limit = min(decode_kernel.MAX_SPLITS, sm_count, blocks)
    best = max(eff(s) for s in range(1, limit + 1) if eligible(s))
    assert 1 <= n <= limit and eligible(n) and eff(n) >= 0.85 * best
    assert all(not (eligible(s) and eff(s) >= 0.85 * best) for s in range(1, n))


# ---- host reads in a decode step ------------------------------------------------------

# Tensor methods that copy values to the host: each is a device->host sync on CUDA.
HOST_READS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__",
              "__index__")


class HostRead(AssertionError):
    pass


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Turn every host read of a tensor value into an error while active, and skip the
    kernel launches themselves (the interpreter reads values on the host to emulate a
    GPU; a real launch does not). ``active(True)`` arms it; returns the launch count."""
    import triton.runtime.interpreter as interpreter

    state = {"armed": False, "launches": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _name=name, _original=original, **kwargs):
            if state["armed"]:
                raise HostRead(f"Tensor.{_name} read a value on the host")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    for name in ("nonzero", "masked_select", "unique"):
        original = getattr(torch, name)

        def guarded_fn(*args, _name=name, _original=original, **kwargs):
            if state["armed"]:
                raise HostRead(f"torch.{_name} reads values on the host")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, guarded_fn)
    run = interpreter.InterpretedFunction.run

    def launch(self, *args, **kwargs):
        if state["armed"]:
            state["launches"] += 1
            return None
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", launch)
    return state


def _tiny_decode_setup(device, dtype=torch.float32):
    """A random tiny encoder-decoder, its encoder output, cross K/V and a cache filled
    by one decode step, as ``generate`` sets them up."""
    from fastencdec import EncDecConfig, EncoderDecoderLM
    from fastencdec.kv_cache import StaticKVCache

    torch.manual_seed(0)
    model = EncoderDecoderLM(EncDecConfig.preset("tiny")).to(device=device, dtype=dtype).eval()
    x = torch.randint(3, 500, (2, 9), device=device)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1, 6:] = False
    states = model.encode(x, mask)
    cross_kv = model.cross_kv(states)
    cache = StaticKVCache.for_model(model.config, model.config.n_decoder_layers, 2, 16,
                                    model.embed.weight, mask_generated_pad=True)
    tokens = torch.full((2, 1), model.config.bos_token_id, device=device)
    model.decode_step(tokens, cache, cross_kv, mask)  # warm-up: tables, tuning, compiles
    cache.advance(1)
    return model, cache, cross_kv, mask, tokens


@pytest.mark.skipif(DEVICE == "cuda", reason="the CUDA test below counts real syncs")
def test_decode_step_reads_nothing_on_the_host(backend, forbid_host_reads, monkeypatch, one_thread):
    """CPU proxy of 'no device->host sync per decode step': with the Triton backend
    and value checks as on CUDA by default (off; FASTENCDEC_CHECKS=1 turns them on),
    one decode step of a real model (append + decode + cross-attention per layer)
    reads no tensor value on the host. The guard itself is shown to fire."""
    from fastencdec.ops import validate

    backend("triton")
    monkeypatch.delenv(validate.CHECKS_ENV_VAR, raising=False)
    # the CUDA rule of validate.values_checked: value checks only when asked for
    monkeypatch.setattr(validate, "values_checked",
                        lambda t: os.environ.get(validate.CHECKS_ENV_VAR) in ("1", "true", "yes"))
    with torch.no_grad():
        model, cache, cross_kv, mask, tokens = _tiny_decode_setup("cpu")
        forbid_host_reads["armed"] = True
        try:
            with pytest.raises(HostRead):
                bool(cache.lens.sum())
            model.decode_step(tokens, cache, cross_kv, mask)
        finally:
            forbid_host_reads["armed"] = False
    layers = model.config.n_decoder_layers
    assert forbid_host_reads["launches"] >= 3 * layers  # append, decode, cross per layer


@pytest.mark.gpu
def test_decode_step_has_no_cuda_sync(backend):
    """One decode step of a real model on CUDA under sync debug mode "error"."""
    backend("triton")
    with torch.no_grad():
        model, cache, cross_kv, mask, tokens = _tiny_decode_setup("cuda", torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model.decode_step(tokens, cache, cross_kv, mask)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(logits.float()).all()
