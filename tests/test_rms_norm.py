"""RMSNorm kernels (C++ on every ISA this CPU runs, Triton) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close, rand
from fastencdec import ops, reference
from fastencdec.ops import dispatch

_C = pytest.importorskip("fastencdec._C")
BACKENDS = ["cpp"] + (["triton"] if dispatch.triton_usable("cpu") else [])


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 64), (1, 1, 1024), (4, 130, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_matches_reference(isa, backend, seed, shape, dtype):
    backend("cpp")
    x = rand(*shape, dtype=dtype, scale=3.0)
    w = rand(shape[-1]) + 1.0
    out = ops.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    expected = reference.rms_norm(x.double(), w.double(), 1e-5)
    assert dispatch.resolve("rms_norm", "cpu", (x, w, 1e-5))[0] == "cpp"
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(backend, seed, dtype):
    if "triton" not in BACKENDS:
        pytest.skip("Triton is not usable here")
    backend("triton")
    x = rand(3, 9, 96, dtype=dtype)
    w = rand(96)
    assert_close(ops.rms_norm(x, w), reference.rms_norm(x.double(), w.double()), dtype)


@pytest.mark.parametrize("name", BACKENDS)
def test_nan_row_and_zero_row(backend, name):
    backend(name)
    x = torch.randn(3, 32)
    x[0, 4] = float("nan")
    x[1] = 0.0
    out = ops.rms_norm(x, torch.ones(32))
    assert torch.isnan(out[0]).all() and (out[1] == 0).all() and torch.isfinite(out[2]).all()


def test_threads_agree(backend, seed):
    backend("cpp")
    x, w = rand(64, 256), rand(256)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.rms_norm(x, w)
        torch.set_num_threads(2)
        two = ops.rms_norm(x, w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_training_and_float64_use_the_reference(seed):
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    ops.rms_norm(x, w).square().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.rms_norm(x2, w2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("call,error,words", [
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.ones(5)), ValueError, ["weight", "4"]),
    (lambda: ops.rms_norm(torch.ones(2, 4, dtype=torch.long), torch.ones(4)), TypeError, ["x"]),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.ones(4), float("nan")), ValueError, ["eps"]),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.ones(1, 4)), ValueError, ["weight"]),
])
def test_bad_inputs(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert all(w in str(info.value) for w in words)
