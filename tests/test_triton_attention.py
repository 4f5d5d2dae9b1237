"""Triton self/cross-attention (fused RoPE + GQA, forward and backward) against the
float64 reference. CPU runs use Triton's interpreter.

Every buffer the kernels must write is NaN-poisoned before the launch
(``poison_alloc``, autouse below), so a forgotten element fails.
Shapes follow a pairwise grid, not a full product: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from fastencdec.kernels import attention_bwd, attention_fwd, attention_setup

import fastencdec.ops as ops
import fastencdec.reference as ref
from _helpers import assert_close, padding_mask, rand
from fastencdec.ops import dispatch
from fastencdec.ops.backends import triton as tb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def triton_backend(backend, poison_alloc):
    backend("triton")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count forward/backward launches, to prove the Triton path ran (no fallback)."""
    calls = {"fwd": 0, "bwd": 0}
    forward, backward = attention_fwd.attention_fwd, attention_bwd.attention_bwd

    def counted_forward(*a, **k):
        calls["fwd"] += 1
        return forward(*a, **k)

    def counted_backward(*a, **k):
        calls["bwd"] += 1
        return backward(*a, **k)

    monkeypatch.setattr(attention_fwd, "attention_fwd", counted_forward)
    monkeypatch.setattr(attention_bwd, "attention_bwd", counted_backward)
    return calls


def _mask(kind, batch, seq_len, device=DEVICE):
    """Key padding masks: right/left padded, one row all masked, or scattered holes."""
    if kind is None:
        return None
    if kind == "right":
        return padding_mask(batch, seq_len, device=device)
    if kind == "left":
        return padding_mask(batch, seq_len, device=device).flip(1)
    if kind == "empty_row":
        return padding_mask(batch, seq_len, fully_masked_row=batch - 1, device=device)
    if kind == "random":
        return torch.rand(batch, seq_len, device=device) < 0.7
    raise ValueError(kind)


def _positions(kind, batch, seq_len, device=DEVICE):
    """None, a start offset, or a [B, L] tensor (centred, so partly negative, as the
    reference checkpoint's encoder uses, plus a random shift per row)."""
    if kind == "offset":
        return int(torch.randint(1, 1000, ()).item())
    if kind == "tensor":
        centred = torch.arange(seq_len) - (seq_len - 1) // 2
        shift = torch.randint(0, 500, (batch, 1))
        return (centred + shift).to(device=device, dtype=torch.int32)
    return None


# RoPE options: "off" disables RoPE, "scale" sets a custom softmax scale, "ntk"
# turns on dynamic NTK scaling (trained context 4, so every L > 4 rescales the base).
ROPE_OPTIONS = {
    "plain": {},
    "off": {"rope": False},
    "scale": {"scale": 0.15},
    "ntk": {"rope_scaling_factor": 2.0, "max_position_embeddings": 4, "rope_theta": 500.0},
}


def _compare(op, q, k, v, dtype, **kwargs):
    """Forward + backward on the Triton backend vs the float64 reference (same inputs)."""
    grad_out = rand(*q.shape, dtype=dtype, device=q.device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = getattr(ops, op)(*leaves, **kwargs)
    out.backward(grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = getattr(ref, op)(*ref_leaves, **kwargs)
    expected.backward(grad_out.double())
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype)
    for name, got, want in zip("qkv", leaves, ref_leaves, strict=True):
        assert_close(got.grad, want.grad, dtype, grad=True, name=f"d{name}")
    return out, leaves


# (L, head_dim, (Hq, Hkv), causal, mask, positions, rope option, dtype): the 16 rows
# cross head_dim x heads fully; every other pair of parameters appears at least
# once (causal x mask, mask x dtype, L x heads, ...). Head dims 96 and 256 close it.
SELF_CASES = [
    (1, 32, (4, 4), True, None, None, "plain", F32),
    (7, 32, (6, 3), False, "right", "offset", "scale", F16),
    (64, 32, (8, 2), True, "empty_row", "tensor", "ntk", F32),
    (129, 32, (8, 1), False, "left", None, "off", F16),
    (300, 64, (4, 4), True, "random", "tensor", "plain", F16),
    (1, 64, (6, 3), True, "empty_row", "offset", "off", F32),
    (7, 64, (8, 2), False, None, None, "ntk", F16),
    (64, 64, (8, 1), True, "right", "offset", "scale", F32),
    (129, 80, (4, 4), True, "right", "tensor", "scale", F32),
    (300, 80, (6, 3), True, "left", None, "ntk", F32),
    (1, 80, (8, 2), False, "random", "offset", "plain", F16),
    (7, 80, (8, 1), True, None, "tensor", "off", F16),
    (64, 128, (4, 4), False, "left", "offset", "ntk", F16),
    (129, 128, (6, 3), False, None, "tensor", "plain", F32),
    (300, 128, (8, 2), True, "empty_row", None, "plain", F16),
    (1, 128, (8, 1), False, "right", "tensor", "ntk", F32),
    (129, 96, (6, 3), True, "right", "offset", "plain", F16),
    (64, 256, (4, 2), False, "empty_row", "tensor", "scale", F32),
    (7, 256, (8, 2), True, "left", None, "ntk", F16),
]


@pytest.mark.parametrize(
    "seq_len,head_dim,heads,causal,mask_kind,pos_kind,rope_option,dtype", SELF_CASES,
    ids=[f"L{c[0]}-D{c[1]}-H{c[2][0]}/{c[2][1]}-{'causal' if c[3] else 'bidir'}-{c[4]}-"
         f"{c[5]}-{c[6]}-{str(c[7])[6:]}" for c in SELF_CASES],
)
def test_self_attention_matches_reference(
    seed, kernel_calls, seq_len, head_dim, heads, causal, mask_kind, pos_kind, rope_option, dtype
):
    batch = 1 if seq_len >= 300 and mask_kind != "empty_row" else 2
    n_heads, n_kv = heads
    q = rand(batch, seq_len, n_heads, head_dim, dtype=dtype, device=DEVICE)
    k = rand(batch, seq_len, n_kv, head_dim, dtype=dtype, device=DEVICE)
    v = rand(batch, seq_len, n_kv, head_dim, dtype=dtype, device=DEVICE)
    out, _ = _compare(
        "self_attention", q, k, v, dtype, causal=causal,
        key_padding_mask=_mask(mask_kind, batch, seq_len),
        positions=_positions(pos_kind, batch, seq_len), **ROPE_OPTIONS[rope_option],
    )
    assert kernel_calls == {"fwd": 1, "bwd": 1}
    if mask_kind == "empty_row":
        assert (out[-1] == 0).all()


# (Lq, Lk, head_dim, (Hq, Hkv), encoder mask, scale, dtype)
CROSS_CASES = [
    (1, 300, 64, (8, 2), "empty_row", None, F32),
    (7, 64, 128, (6, 3), "right", 0.2, F16),
    (129, 7, 32, (8, 1), "left", None, F16),
    (64, 129, 80, (4, 4), None, None, F32),
    (300, 1, 96, (6, 3), "random", None, F32),
    (20, 33, 256, (4, 1), "empty_row", 0.1, F16),
]


@pytest.mark.parametrize(
    "len_q,len_k,head_dim,heads,mask_kind,scale,dtype", CROSS_CASES,
    ids=[f"Lq{c[0]}-Lk{c[1]}-D{c[2]}-H{c[3][0]}/{c[3][1]}-{c[4]}-{str(c[6])[6:]}"
         for c in CROSS_CASES],
)
def test_cross_attention_matches_reference(
    seed, kernel_calls, len_q, len_k, head_dim, heads, mask_kind, scale, dtype
):
    batch = 2
    n_heads, n_kv = heads
    q = rand(batch, len_q, n_heads, head_dim, dtype=dtype, device=DEVICE)
    k = rand(batch, len_k, n_kv, head_dim, dtype=dtype, device=DEVICE)
    v = rand(batch, len_k, n_kv, head_dim, dtype=dtype, device=DEVICE)
    _compare("cross_attention", q, k, v, dtype,
             key_padding_mask=_mask(mask_kind, batch, len_k), scale=scale)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


# (L, head_dim, (Hq, Hkv), causal, mask, positions, which inputs need grad)
NONDETERMINISTIC_CASES = [
    (77, 32, (4, 2), True, "left", "tensor", "qkv"),
    (40, 80, (6, 3), False, "empty_row", "offset", "q"),
    (129, 64, (8, 1), True, None, None, "qk"),
]


@pytest.mark.parametrize("seq_len,head_dim,heads,causal,mask_kind,pos_kind,needs",
                         NONDETERMINISTIC_CASES)
def test_nondeterministic_backward_matches_reference(seed, kernel_calls, seq_len, head_dim,
                                                     heads, causal, mask_kind, pos_kind, needs):
    """deterministic=False: dQ accumulated with atomics inside the dK/dV kernel (no dQ
    kernel), also when only q needs a gradient."""
    batch, (n_q, n_kv) = 2, heads
    q = rand(batch, seq_len, n_q, head_dim, device=DEVICE)
    k = rand(batch, seq_len, n_kv, head_dim, device=DEVICE)
    v = rand(batch, seq_len, n_kv, head_dim, device=DEVICE)
    kw = dict(causal=causal, key_padding_mask=_mask(mask_kind, batch, seq_len),
              positions=_positions(pos_kind, batch, seq_len))
    original = attention_bwd._attention_bwd_dq_kernel
    leaves = [t.clone().requires_grad_(name in needs)
              for name, t in zip("qkv", (q, k, v), strict=True)]
    grad_out = rand(*q.shape, device=DEVICE)
    out = ops.self_attention(*leaves, deterministic=False, **kw)
    try:
        attention_bwd._attention_bwd_dq_kernel = None  # launching it would fail
        out.backward(grad_out)
    finally:
        attention_bwd._attention_bwd_dq_kernel = original
    ref_leaves = [t.double().requires_grad_(name in needs)
                  for name, t in zip("qkv", (q, k, v), strict=True)]
    ref.self_attention(*ref_leaves, **kw).backward(grad_out.double())
    for name, got, want in zip("qkv", leaves, ref_leaves, strict=True):
        if name in needs:
            assert_close(got.grad, want.grad, F32, grad=True, name=f"d{name}")
        else:
            assert got.grad is None
    assert kernel_calls == {"fwd": 1, "bwd": 1}


def test_nondeterministic_cross_attention_and_bad_flag(seed):
    q = rand(2, 9, 4, 64, device=DEVICE).requires_grad_()
    k = rand(2, 30, 2, 64, device=DEVICE).requires_grad_()
    mask = _mask("right", 2, 30)
    out = ops.cross_attention(q, k, k, key_padding_mask=mask, deterministic=False)
    out.backward(torch.ones_like(out))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref.cross_attention(q64, k64, k64, key_padding_mask=mask).backward(
        torch.ones(out.shape, dtype=torch.float64))
    assert_close(q.grad, q64.grad, F32, grad=True, name="dq")
    assert_close(k.grad, k64.grad, F32, grad=True, name="dk")
    with pytest.raises(TypeError, match="deterministic"):
        ops.self_attention(q, q, q, causal=True, deterministic="no")


@pytest.mark.parametrize("splits,deterministic", [(1, True), (2, True), (4, True), (2, False)])
def test_group_split_dkdv(seed, kernel_calls, monkeypatch, splits, deterministic):
    """The dK/dV kernel with its GQA group (4 query heads per K/V head) split over 1, 2
    or 4 programs (fp32 partials summed by the launcher) gives the same gradients."""
    monkeypatch.setenv(tb.GROUP_SPLITS_ENV_VAR, str(splits))
    batch, seq_len = 2, 70
    q = rand(batch, seq_len, 8, 32, device=DEVICE)
    k = rand(batch, seq_len, 2, 32, device=DEVICE)
    v = rand(batch, seq_len, 2, 32, device=DEVICE)
    mask = _mask("left", batch, seq_len)
    grad_out = rand(*q.shape, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ops.self_attention(*leaves, causal=True, key_padding_mask=mask, positions=2,
                       deterministic=deterministic).backward(grad_out)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref.self_attention(*ref_leaves, causal=True, key_padding_mask=mask,
                       positions=2).backward(grad_out.double())
    for name, got, want in zip("qkv", leaves, ref_leaves, strict=True):
        assert_close(got.grad, want.grad, F32, grad=True, name=f"d{name}, {splits} splits")
    assert kernel_calls == {"fwd": 1, "bwd": 1}


def test_group_split_heuristic(monkeypatch):
    split = attention_bwd.group_splits
    assert split(64, 4, 4096, 4, 132) == 1  # 16384 programs: plenty
    assert split(1, 2, 512, 4, 132) == 4  # 16 programs: the whole group
    assert split(2, 4, 1024, 4, 132) == 4  # 128 programs; x2 = 256 < 264; x4 reaches it
    assert split(2, 4, 2048, 4, 132) == 2  # 256 programs; x2 = 512
    assert split(1, 1, 64, 1, 132) == 1  # no group to split
    assert split(1, 3, 512, 2, 132) == 2  # mu-330m's 6/3 heads
    assert split(8, 2, 128, 6, 8, forced=4) == 3  # forced: the largest divisor <= 4
    monkeypatch.setenv(tb.GROUP_SPLITS_ENV_VAR, "0")
    with pytest.raises(ValueError, match=tb.GROUP_SPLITS_ENV_VAR):
        tb._env_int(tb.GROUP_SPLITS_ENV_VAR)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_non_positive_scale(seed, kernel_calls, scale):
    """The kernels need a positive scale (row max before scaling): a scale <= 0 is
    folded into q, and dq turned back the same way."""
    q = rand(2, 33, 4, 32, device=DEVICE)
    k = rand(2, 33, 2, 32, device=DEVICE)
    v = rand(2, 33, 2, 32, device=DEVICE)
    _compare("self_attention", q, k, v, F32, causal=True, scale=scale,
             key_padding_mask=_mask("left", 2, 33), positions=4)
    _compare("cross_attention", q, k, v, F32, scale=scale)
    assert kernel_calls == {"fwd": 2, "bwd": 2}


def test_masked_rows_give_exact_zeros(seed):
    """Left padding + causal leaves the first queries of row 0 with no key; row 1 is
    all padding. Their outputs and every gradient they cause are exactly 0."""
    batch, seq_len, head_dim = 2, 40, 64
    q = rand(batch, seq_len, 4, head_dim, device=DEVICE).requires_grad_()
    k = rand(batch, seq_len, 2, head_dim, device=DEVICE).requires_grad_()
    v = rand(batch, seq_len, 2, head_dim, device=DEVICE).requires_grad_()
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=DEVICE)
    mask[0, :5] = False
    mask[1] = False
    out = ops.self_attention(q, k, v, causal=True, key_padding_mask=mask, positions=7)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0, :5] == 0).all() and (out[0, 5:] != 0).any()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
        assert (grad[1] == 0).all() and (grad[0, :5] == 0).all()


def test_no_repeated_kv_in_forward_or_backward(seed, kernel_calls, monkeypatch):
    """GQA reads K/V head h // group in the kernel: no repeat/expand copy is made."""
    q = rand(2, 33, 8, 64, device=DEVICE).requires_grad_()
    k = rand(2, 33, 2, 64, device=DEVICE).requires_grad_()
    v = rand(2, 33, 2, 64, device=DEVICE).requires_grad_()

    def forbidden(*args, **kwargs):
        raise AssertionError("K/V must not be repeated")

    for owner, name in [(torch, "repeat_interleave"), (torch.Tensor, "repeat_interleave"),
                        (torch.Tensor, "repeat"), (torch.Tensor, "expand"),
                        (torch.Tensor, "expand_as")]:
        monkeypatch.setattr(owner, name, forbidden)
    out = ops.self_attention(q, k, v, causal=True, positions=3)
    out.backward(torch.ones_like(out))
    out = ops.cross_attention(q, k, v)
    out.backward(torch.ones_like(out))
    monkeypatch.undo()
    assert kernel_calls == {"fwd": 2, "bwd": 2}


def test_poisoning_catches_unwritten_outputs(monkeypatch):
    """With the launch skipped, the poisoned output is all NaN (the check is real)."""
    monkeypatch.setattr(attention_fwd, "launch", lambda *args, **kwargs: None)
    q = rand(1, 5, 2, 32, device=DEVICE)
    out = ops.self_attention(q, q[:, :, :1], q[:, :, :1], causal=False)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("blocks", [
    {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)},
    {"fwd": (32, 16), "dkdv": (16, 32), "dq": (16, 32)},
], ids=["square", "skewed"])
def test_other_tile_shapes(seed, kernel_calls, monkeypatch, blocks):
    """The masked/unmasked phase split is right for other BLOCK_M/BLOCK_N ratios."""
    if DEVICE == "cuda":
        pytest.skip("tile shapes are autotuned on a GPU")
    monkeypatch.setattr(attention_setup, "INTERPRETER_BLOCKS", blocks)
    batch, seq_len = 2, 77
    q = rand(batch, seq_len, 4, 32)
    k = rand(batch, seq_len, 2, 32)
    v = rand(batch, seq_len, 2, 32)
    mask = padding_mask(batch, seq_len).flip(1)
    _compare("self_attention", q, k, v, F32, causal=True, key_padding_mask=mask, positions=9)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


def test_non_contiguous_inputs(seed, kernel_calls):
    """q from a [B, H, L, D] buffer, k a head slice, v with a strided head_dim."""
    batch, seq_len, head_dim = 2, 45, 64
    q = rand(batch, 6, seq_len, head_dim).transpose(1, 2)
    k = rand(batch, seq_len, 5, head_dim)[:, :, 1:4]
    v = rand(batch, seq_len, 3, 2 * head_dim)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _compare("self_attention", q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), F32, causal=True,
             key_padding_mask=_mask("random", batch, seq_len), positions=2)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


def test_nan_input_propagates(seed):
    """A NaN in a query gives NaN in that row only; a NaN in a real key reaches every
    query that sees it, exactly as in the reference. Never a hang or a crash."""
    q = rand(2, 40, 4, 32, device=DEVICE)
    k = rand(2, 40, 2, 32, device=DEVICE)
    v = rand(2, 40, 2, 32, device=DEVICE)
    q[0, 5, 1, 3] = float("nan")
    k[1, 10, 0, 0] = float("nan")
    out = ops.self_attention(q, k, v, causal=True)
    expected = ref.self_attention(q, k, v, causal=True)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.isnan(out[0, 5, 1]).all() and torch.isnan(out[1, 10:, :2]).all()


def test_large_scores_stay_finite(seed):
    """|scores| in the thousands: the online softmax must not overflow."""
    q = rand(2, 50, 4, 64, device=DEVICE, scale=10.0)
    k = rand(2, 50, 4, 64, device=DEVICE, scale=10.0)
    v = rand(2, 50, 4, 64, device=DEVICE)
    out = ops.self_attention(q, k, v, causal=False, scale=1.0, rope=False)
    expected = ref.self_attention(q.double(), k.double(), v.double(), causal=False,
                                  scale=1.0, rope=False)
    assert torch.isfinite(out).all()
    # Scores ~1e3 carry fp32 rounding ~1e-4 into the exponent: compare accordingly.
    torch.testing.assert_close(out.double(), expected, atol=5e-3, rtol=5e-3)


def test_positions_forms_agree(seed):
    """None, an int, a 0-d tensor and the equivalent [B, L] tensor give one result."""
    batch, seq_len = 2, 20
    q = rand(batch, seq_len, 4, 32, device=DEVICE)
    k = rand(batch, seq_len, 4, 32, device=DEVICE)
    run = lambda pos: ops.self_attention(q, k, k, causal=True, positions=pos)
    table = (torch.arange(seq_len) + 11).expand(batch, seq_len).to(DEVICE)
    assert torch.equal(run(None), run(0))
    assert torch.equal(run(11), run(torch.tensor(11)))
    torch.testing.assert_close(run(11), run(table), atol=1e-6, rtol=1e-6)


def test_unsupported_inputs_fall_back_to_reference(seed):
    """head_dim 48 has no kernel: the reference runs, with a warning."""
    dispatch.clear_cache()
    q = rand(1, 9, 2, 48, device=DEVICE)
    with pytest.warns(UserWarning, match="head_dim 48"):
        out = ops.self_attention(q, q, q, causal=True)
    assert_close(out, ref.self_attention(q.double(), q.double(), q.double(), causal=True), F32)
    assert tb._unsupported_attention(q[..., :32].to(F16), q, q) is None
    if DEVICE == "cpu":
        assert "interpreter" in tb._unsupported_attention(q[..., :32].to(BF16), q, q)


def test_cross_attention_decode_fast_path(seed, monkeypatch):
    """Inference with Lq <= 16 goes to the split-K decode kernel; training, or more
    queries, stay on the flash kernel."""
    seen = []

    def fake_decode(q, k, v, **kwargs):
        seen.append(q.shape[1])
        return torch.zeros_like(q)

    monkeypatch.setattr(tb._decode, "decode_attention", fake_decode)
    k = rand(1, 30, 2, 32, device=DEVICE)
    q = rand(1, 16, 4, 32, device=DEVICE)
    ops.cross_attention(q, k, k)
    ops.cross_attention(rand(1, 17, 4, 32, device=DEVICE), k, k)
    ops.cross_attention(q.clone().requires_grad_(), k, k)
    assert seen == [16]


def test_cross_attention_decode_path_is_correct(seed):
    q = rand(2, 3, 6, 64, device=DEVICE)
    k = rand(2, 50, 3, 64, device=DEVICE)
    mask = _mask("empty_row", 2, 50)
    out = ops.cross_attention(q, k, k, key_padding_mask=mask)
    assert_close(out, ref.cross_attention(q.double(), k.double(), k.double(),
                                          key_padding_mask=mask), F32)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim,heads", [(128, (16, 4)), (64, (6, 3)), (256, (8, 2))])
def test_gpu_bf16_long_sequences(seed, kernel_calls, causal, head_dim, heads):
    batch, seq_len = 2, 1024
    n_heads, n_kv = heads
    q = rand(batch, seq_len, n_heads, head_dim, dtype=BF16, device="cuda")
    k = rand(batch, seq_len, n_kv, head_dim, dtype=BF16, device="cuda")
    v = rand(batch, seq_len, n_kv, head_dim, dtype=BF16, device="cuda")
    _compare("self_attention", q, k, v, BF16, causal=causal,
             key_padding_mask=_mask("empty_row", batch, seq_len, device="cuda"), positions=5)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_gpu_cross_attention_dtypes(seed, kernel_calls, dtype):
    q = rand(2, 200, 8, 80, dtype=dtype, device="cuda")
    k = rand(2, 777, 2, 80, dtype=dtype, device="cuda")
    v = rand(2, 777, 2, 80, dtype=dtype, device="cuda")
    _compare("cross_attention", q, k, v, dtype,
             key_padding_mask=_mask("right", 2, 777, device="cuda"))


@pytest.mark.gpu
def test_gpu_memory_stays_linear(seed):
    """Peak extra memory of forward + backward is O(L), far below one L x L score
    matrix or one repeated K."""
    batch, seq_len, n_heads, n_kv, head_dim = 1, 4096, 16, 2, 128
    q = rand(batch, seq_len, n_heads, head_dim, dtype=BF16, device="cuda").requires_grad_()
    k = rand(batch, seq_len, n_kv, head_dim, dtype=BF16, device="cuda").requires_grad_()
    v = rand(batch, seq_len, n_kv, head_dim, dtype=BF16, device="cuda").requires_grad_()
    ops.self_attention(q, k, v, causal=True).sum().backward()  # warm up (autotuning)
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ops.self_attention(q, k, v, causal=True).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # out, grad_out (made contiguous), dq; dk, dv; the fp32 row statistics are small.
    io_bytes = 3 * q.numel() * q.element_size() + 2 * k.numel() * k.element_size()
    # One repeated K (or one bf16 score row block per head) would be >= q's size.
    assert extra < io_bytes + q.numel() * q.element_size() // 2
