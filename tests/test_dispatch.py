"""The dispatch module: forced backends, fallbacks said once, autograd routing."""

import warnings

import pytest
import torch

from fastencdec import ops, reference
from fastencdec.ops import dispatch


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_BACKEND", "reference")
    assert dispatch.choose_backend("apply_rope", torch.device("cpu")) == "reference"


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTENCDEC_BACKEND"):
        ops.apply_rope(torch.randn(1, 2, 1, 4))


def test_cpu_prefers_cpp_for_inference(monkeypatch):
    monkeypatch.delenv("FASTENCDEC_BACKEND", raising=False)
    assert dispatch.choose_backend("apply_rope", torch.device("cpu")) == "cpp"


def test_cpp_is_inference_only(monkeypatch):
    """With gradients needed on the CPU the reference runs, and the gradient is right."""
    monkeypatch.delenv("FASTENCDEC_BACKEND", raising=False)
    assert dispatch.choose_backend("apply_rope", torch.device("cpu"), needs_grad=True) == "reference"
    x = torch.randn(1, 3, 2, 8, requires_grad=True)
    ops.apply_rope(x, 1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unsupported_input_falls_back_once(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_BACKEND", "cpp")
    dispatch._warned.clear()
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = ops.apply_rope(x, 2)
        ops.apply_rope(x, 2)
    messages = [str(w.message) for w in caught if "apply_rope" in str(w.message)]
    assert len(messages) == 1 and "float64" in messages[0] and "reference" in messages[0]
    torch.testing.assert_close(out1, reference.apply_rope(x, 2))


def test_missing_kernel_under_forced_backend_warns(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_BACKEND", "cpp")
    dispatch._warned.clear()
    monkeypatch.setitem(dispatch.KERNELS, "cross_attention", {})
    q = torch.randn(1, 2, 2, 8)
    with pytest.warns(UserWarning, match="no cpp kernel"):
        ops.cross_attention(q, q, q)


def test_summary_lists_every_op():
    summary = dispatch.summary("cpu")
    assert set(summary) == set(dispatch.KERNELS)
    assert all(v in dispatch.BACKENDS for v in summary.values())


def test_every_op_has_a_reference():
    assert set(dispatch.REFERENCE) >= set(dispatch.KERNELS)
    for target in dispatch.REFERENCE.values():
        assert callable(dispatch._load(target))
