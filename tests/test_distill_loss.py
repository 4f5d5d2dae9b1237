"""Fused distillation loss (Triton, and the chunked CPU loss) against the float64
reference: loss and gradients.

CPU runs use Triton's interpreter, and the CPU backend ("cpp": torch GEMMs + a
vectorised row kernel) runs every case too. Ignored rows hold NaN (hidden states, logits and
teacher logits) in every case, so a masked row that leaks shows up as NaN, and fresh
``torch.empty`` buffers are NaN-filled so an unwritten output fails. Cases follow a
covering grid (divergence x alpha x tau x vocab sizes x dtypes), not a full product.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastencdec.ops as ops
import fastencdec.reference as ref
from _helpers import DISTILL_LARGE_LOGITS_TOLERANCE, assert_close, rand
from fastencdec.ops import dispatch
from fastencdec.ops.backends import distill_chunks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
IGNORE = -100


LOSS_BACKENDS = ["triton"] + (["cpp"] if DEVICE == "cpu" else [])


@pytest.fixture(params=LOSS_BACKENDS)
def loss_backend(request, backend):
    """Each test runs on every backend with a fused loss kernel for this device."""
    backend(request.param)
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    """Kernel blocks of 256 columns: V = 1000 spans several (the online rescaling runs)
    and vocabulary boundaries such as V_t = 700 fall inside a block."""
    monkeypatch.setattr("fastencdec.kernels.distill_loss.BLOCK_V_MAX", 256)


def _labels(n, vocab, ignored=(0, 5, 6), device=DEVICE):
    labels = torch.randint(0, vocab, (n,))
    labels[list(i for i in ignored if i < n)] = IGNORE
    return labels.to(device)


def _poison_ignored(t, labels):
    """NaN in the rows of ``t`` whose label is ignored."""
    return t.masked_fill((labels == IGNORE)[:, None], float("nan"))


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _check_grads(pairs, dtype):
    for name, actual, expected in pairs:
        assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}"
        assert_close(actual, expected, dtype, grad=True, name=name)


# (divergence, alpha, tau, V_s, V_t, student dtype, teacher dtype, chunk_size).
# N = 22 rows with 3 ignored: chunks of 8 real rows leave a partial last chunk.
FUSED_CASES = [
    ("reverse_kl", 0.5, 1.0, 1000, 1000, F32, F32, 8),
    ("reverse_kl", 0.5, 2.0, 1000, 1300, F32, F16, None),
    ("reverse_kl", 1.0, 2.0, 1000, 700, F32, F32, 8),
    ("reverse_kl", 0.0, 1.0, 333, 400, F32, F32, 8),
    ("reverse_kl", 0.5, 2.0, 1000, 1000, F16, F16, 8),
    ("forward_kl", 0.5, 2.0, 1000, 1000, F32, F16, 8),
    ("forward_kl", 1.0, 1.0, 1000, 1300, F32, F32, None),
    ("forward_kl", 0.0, 2.0, 1000, 700, F32, F32, 8),
    ("forward_kl", 0.5, 1.0, 1000, 700, F32, F32, 8),
    ("forward_kl", 0.5, 1.0, 1000, 1000, F16, F32, None),
]


@pytest.mark.parametrize("divergence,alpha,tau,v_s,v_t,dtype,t_dtype,chunk", FUSED_CASES)
def test_fused_matches_reference(loss_backend, poison_alloc, small_blocks, seed,
                                 divergence, alpha, tau, v_s, v_t, dtype, t_dtype, chunk):
    n, d = 22, 24
    labels = _labels(n, v_s)
    hidden = _poison_ignored(rand(n, d, dtype=dtype, device=DEVICE), labels)
    weight = rand(v_s, d, dtype=dtype, device=DEVICE, scale=0.5)
    teacher = _poison_ignored(rand(n, v_t, dtype=t_dtype, device=DEVICE, scale=2.0), labels)
    kw = dict(alpha=alpha, temperature=tau, divergence=divergence)

    h, w = _leaf(hidden), _leaf(weight)
    loss = ops.distill_loss(h, w, teacher, labels, chunk_size=chunk, **kw)
    (1.7 * loss).backward()
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    expected = ref.distill_loss(h64, w64, teacher.double(), labels, **kw)
    (1.7 * expected).backward()

    assert loss.dtype == torch.float32
    assert_close(loss, expected, dtype, name="loss")
    _check_grads([("grad_hidden", h.grad, h64.grad), ("grad_weight", w.grad, w64.grad)], dtype)


# (divergence, alpha, tau, V_s, V_t, logits dtype, teacher dtype)
LOGITS_CASES = [
    ("reverse_kl", 0.5, 2.0, 1000, 1100, F32, F32),
    ("forward_kl", 0.5, 1.0, 1000, 800, F16, F16),
    ("reverse_kl", 1.0, 1.0, 777, 777, F32, F16),
    ("forward_kl", 0.0, 2.0, 500, 600, F32, F32),
]


@pytest.mark.parametrize("divergence,alpha,tau,v_s,v_t,dtype,t_dtype", LOGITS_CASES)
def test_from_logits_matches_reference(loss_backend, poison_alloc, small_blocks, seed,
                                       divergence, alpha, tau, v_s, v_t, dtype, t_dtype):
    n = 29
    labels = _labels(n, v_s)
    logits = _poison_ignored(rand(n, v_s, dtype=dtype, device=DEVICE, scale=3.0), labels)
    # The teacher is a strided view (every other column of a wider tensor).
    wide = rand(n, 2 * v_t, dtype=t_dtype, device=DEVICE, scale=3.0)
    teacher = _poison_ignored(wide, labels)[:, ::2]
    kw = dict(alpha=alpha, temperature=tau, divergence=divergence)

    z = _leaf(logits)
    loss = ops.distill_loss_from_logits(z, teacher, labels, **kw)
    (0.5 * loss).backward()
    z64 = _leaf(logits, torch.float64)
    expected = ref.distill_loss_from_logits(z64, teacher.double(), labels, **kw)
    (0.5 * expected).backward()

    assert_close(loss, expected, dtype, name="loss")
    _check_grads([("grad_logits", z.grad, z64.grad)], dtype)


@pytest.mark.parametrize("divergence,v_t,t_dtype,chunk",
                         [("reverse_kl", 1200, F16, 8), ("forward_kl", 900, F32, None)])
def test_from_teacher_hidden_matches_reference(loss_backend, poison_alloc, small_blocks, seed,
                                               divergence, v_t, t_dtype, chunk):
    n, d, d_t, v_s = 21, 16, 40, 1000
    labels = _labels(n, v_s)
    hidden = _poison_ignored(rand(n, d, device=DEVICE), labels)
    weight = rand(v_s, d, device=DEVICE, scale=0.5)
    t_hidden = _poison_ignored(rand(n, d_t, dtype=t_dtype, device=DEVICE), labels)
    t_weight = rand(v_t, d_t, dtype=t_dtype, device=DEVICE, scale=0.3)
    kw = dict(alpha=0.5, temperature=2.0, divergence=divergence)

    h, w = _leaf(hidden), _leaf(weight)
    loss = ops.distill_loss_from_teacher_hidden(h, w, t_hidden, t_weight, labels,
                                                chunk_size=chunk, **kw)
    loss.backward()
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    # The teacher's logits are rounded to its dtype in the kernel path: do the same here.
    t_logits = (t_hidden.double() @ t_weight.double().t()).to(t_dtype).double()
    expected = ref.distill_loss(h64, w64, t_logits, labels, **kw)
    expected.backward()

    assert_close(loss, expected, F32, name="loss")
    _check_grads([("grad_hidden", h.grad, h64.grad), ("grad_weight", w.grad, w64.grad)], F32)


def test_all_rows_ignored_gives_zero(loss_backend, poison_alloc, seed):
    n, d, v = 6, 8, 300
    labels = torch.full((n,), IGNORE, device=DEVICE)
    nan = float("nan")
    h = _leaf(torch.full((n, d), nan, device=DEVICE))
    w = _leaf(rand(v, d, device=DEVICE))
    z = _leaf(torch.full((n, v), nan, device=DEVICE))
    teacher = torch.full((n, v), nan, device=DEVICE)
    for loss in (ops.distill_loss(h, w, teacher, labels),
                 ops.distill_loss_from_logits(z, teacher, labels),
                 ops.distill_loss_from_teacher_hidden(h, w, h.detach(), w.detach(), labels)):
        loss.backward()
        assert loss.item() == 0.0
    for name, grad in (("hidden", h.grad), ("weight", w.grad), ("logits", z.grad)):
        assert (grad == 0).all(), name


@pytest.mark.parametrize("divergence,tau,shape", [("reverse_kl", 1.0, "spread"),
                                                  ("forward_kl", 2.0, "spread"),
                                                  ("reverse_kl", 2.0, "offset"),
                                                  ("forward_kl", 1.0, "offset")])
def test_huge_logits(loss_backend, small_blocks, seed, divergence, tau, shape):
    """Logits of magnitude 1e4 on large offsets. "spread": near one-hot distributions;
    "offset": student ~ teacher, so the divergence is small next to the logits and any
    statistic not kept relative to the running max loses it to cancellation."""
    n, v = 9, 1000
    labels = _labels(n, v, ignored=(3,))
    base = rand(n, v, dtype=torch.float64, device=DEVICE)
    if shape == "spread":
        logits = (1e4 * base + 3e4).float()
        teacher = (1e4 * rand(n, v, dtype=torch.float64, device=DEVICE) - 2e4).float()
    else:
        logits = (base + 3e4).float()
        teacher = (base + 0.1 * rand(n, v, dtype=torch.float64, device=DEVICE) - 2e4).float()
    kw = dict(alpha=0.5, temperature=tau, divergence=divergence)
    z = _leaf(logits)
    loss = ops.distill_loss_from_logits(z, teacher, labels, **kw)
    loss.backward()
    z64 = _leaf(logits, torch.float64)
    expected = ref.distill_loss_from_logits(z64, teacher.double(), labels, **kw)
    expected.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    atol, rtol, spread_grad = DISTILL_LARGE_LOGITS_TOLERANCE
    torch.testing.assert_close(loss.double(), expected, atol=atol, rtol=rtol)
    if shape == "spread":  # fp32 rounds log-ratios of ~1e4 by ~1e-3 (see _helpers)
        atol = spread_grad * float(z64.grad.abs().max())
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_one_hot_teacher(loss_backend, small_blocks, seed, divergence):
    """A teacher whose probabilities underflow to exactly one-hot: 0 * log 0 = 0."""
    n, v, d = 11, 500, 16
    labels = _labels(n, v, ignored=(2,))
    teacher = torch.full((n, v), -1e4, device=DEVICE)
    teacher[torch.arange(n), labels.clamp(min=0)] = 10.0
    hidden, weight = rand(n, d, device=DEVICE), rand(v, d, device=DEVICE)
    kw = dict(alpha=0.7, temperature=2.0, divergence=divergence)
    h, w = _leaf(hidden), _leaf(weight)
    loss = ops.distill_loss(h, w, teacher, labels, **kw)
    loss.backward()
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    expected = ref.distill_loss(h64, w64, teacher.double(), labels, **kw)
    expected.backward()
    assert torch.isfinite(loss)
    assert_close(loss, expected, F32, name="loss")
    _check_grads([("grad_hidden", h.grad, h64.grad), ("grad_weight", w.grad, w64.grad)], F32)


def test_full_vocab_small_batch(loss_backend, poison_alloc, seed):
    """mu-330m's vocabulary (32128, several kernel blocks, not a power of two)."""
    n, d, v = 5, 16, 32128
    labels = _labels(n, v, ignored=(1,))
    hidden, weight = rand(n, d, device=DEVICE), rand(v, d, device=DEVICE, scale=0.3)
    teacher = rand(n, v + 72, dtype=F16, device=DEVICE)
    h, w = _leaf(hidden), _leaf(weight)
    loss = ops.distill_loss(h, w, teacher, labels, temperature=2.0)
    loss.backward()
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    expected = ref.distill_loss(h64, w64, teacher.double(), labels, temperature=2.0)
    expected.backward()
    assert_close(loss, expected, F32, name="loss")
    _check_grads([("grad_hidden", h.grad, h64.grad), ("grad_weight", w.grad, w64.grad)], F32)


def test_gradient_only_where_needed(loss_backend, seed):
    """No grad mode, and a frozen LM head: the loss is unchanged, grads only for leaves.
    (The labels are a strided view.)"""
    n, d, v = 12, 8, 200
    labels = torch.stack([_labels(n, v)] * 2, dim=1)[:, 0]
    hidden, weight = rand(n, d, device=DEVICE), rand(v, d, device=DEVICE)
    teacher = rand(n, v, device=DEVICE)
    expected = ref.distill_loss(hidden.double(), weight.double(), teacher.double(), labels)
    h = _leaf(hidden)
    with torch.no_grad():
        assert_close(ops.distill_loss(h, weight, teacher, labels), expected, F32)
    loss = ops.distill_loss(h, weight, teacher, labels)
    assert_close(loss, expected, F32)
    loss.backward()
    h64 = _leaf(hidden, torch.float64)
    ref.distill_loss(h64, weight.double(), teacher.double(), labels).backward()
    assert_close(h.grad, h64.grad, F32, grad=True, name="grad_hidden")
    plain = ops.distill_loss(hidden, weight, teacher, labels)
    assert not plain.requires_grad
    assert_close(plain, expected, F32)


def test_fused_backend_is_used(loss_backend):
    for op in ("distill_loss", "distill_loss_from_logits", "distill_loss_from_teacher_hidden"):
        assert dispatch.resolve(op, DEVICE)[0] == loss_backend


def test_chunk_rows_fit_the_budget():
    row = 32128 * 2  # mu-330m, bf16 logits
    rows = distill_chunks.choose_chunk_rows(8192, row)
    assert rows * row <= distill_chunks.GPU_CHUNK_BYTES + 64 * row
    assert math.ceil(8192 / rows) == 2  # a few large chunks, not many small ones
    assert distill_chunks.choose_chunk_rows(100, row) == 100  # one chunk, capped by N
    assert distill_chunks.choose_chunk_rows(0, row) == 1
    assert distill_chunks.choose_chunk_rows(5, 10**12) == 1  # a huge row still progresses


def test_teacher_hidden_validation():
    h, w = torch.randn(4, 8), torch.randn(50, 8)
    th, tw, labels = torch.randn(4, 6), torch.randn(60, 6), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_head_weight"):
        ops.distill_loss_from_teacher_hidden(h, w, th, torch.randn(60, 7), labels)
    with pytest.raises(ValueError, match="teacher_hidden"):
        ops.distill_loss_from_teacher_hidden(h, w, torch.randn(3, 6), tw, labels)
    with pytest.raises(TypeError, match="teacher_head_weight"):
        ops.distill_loss_from_teacher_hidden(h, w, th, tw.half(), labels)
    with pytest.raises(ValueError, match="labels"):
        ops.distill_loss_from_teacher_hidden(h, w, th, tw, torch.full((4,), 50))


# ---- GPU: bf16 and realistic shapes ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("divergence,chunk", [("reverse_kl", None), ("forward_kl", 256)])
def test_bf16_realistic_shape(loss_backend, seed, divergence, chunk):
    n, d, v = 1024, 512, 32128
    labels = _labels(n, v, ignored=range(0, n, 7))
    hidden = _poison_ignored(rand(n, d, dtype=BF16, device=DEVICE), labels)
    weight = rand(v, d, dtype=BF16, device=DEVICE, scale=0.05)
    teacher = rand(n, v + 128, dtype=BF16, device=DEVICE, scale=2.0)
    kw = dict(alpha=0.5, temperature=2.0, divergence=divergence)
    h, w = _leaf(hidden), _leaf(weight)
    loss = ops.distill_loss(h, w, teacher, labels, chunk_size=chunk, **kw)
    loss.backward()
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    expected = ref.distill_loss(h64, w64, teacher.double(), labels, **kw)
    expected.backward()
    assert_close(loss, expected, BF16, name="loss")
    _check_grads([("grad_hidden", h.grad, h64.grad), ("grad_weight", w.grad, w64.grad)], BF16)


@pytest.mark.gpu
def test_peak_memory_stays_below_full_logits(backend):
    """The fused op must not materialise [N, V] logits (in any dtype)."""
    backend("triton")
    n, d, v = 8192, 1024, 32128
    hidden = _leaf(rand(n, d, dtype=BF16, device=DEVICE))
    weight = _leaf(rand(v, d, dtype=BF16, device=DEVICE, scale=0.05))
    teacher = rand(n, v, dtype=BF16, device=DEVICE)
    labels = _labels(n, v)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.distill_loss(hidden, weight, teacher, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_logits_bf16 = n * v * 2
    assert extra < full_logits_bf16, f"peak extra memory {extra / 2**20:.0f} MiB"
