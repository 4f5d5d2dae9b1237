"""The dispatch module: forced backends, fallbacks said once, training routing, one
signature per op across every backend and the custom ops."""

import inspect
import warnings

import pytest
import torch

from fastencdec import ops, reference
from fastencdec.ops import dispatch, library
from fastencdec.ops.schema import SCHEMAS, flatten, unflatten


@pytest.fixture(autouse=True)
def fresh_dispatch():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_BACKEND", "reference")
    assert dispatch.choose_backend("apply_rope", "cpu") == "reference"


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTENCDEC_BACKEND"):
        ops.apply_rope(torch.randn(1, 2, 1, 4))


def test_cpu_prefers_cpp_for_inference(monkeypatch):
    monkeypatch.delenv("FASTENCDEC_BACKEND", raising=False)
    assert dispatch.choose_backend("apply_rope", "cpu") == "cpp"
    assert dispatch.choose_backend("decode_attention", "cpu") == "cpp"


def test_cpu_training_runs_the_reference_silently(monkeypatch):
    """The C++ kernels are inference-only: training ops resolve to the reference on the
    CPU without a warning, and the gradient is right."""
    monkeypatch.delenv("FASTENCDEC_BACKEND", raising=False)
    assert dispatch.choose_backend("self_attention_with_lse", "cpu") == "reference"
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 1, 8, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.self_attention(q, k, k, causal=True)
    expected = reference.self_attention(q, k, k, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_unsupported_input_falls_back_once(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_BACKEND", "cpp")
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
    original = dispatch.kernels
    table = dict(original("cpp"))
    table.pop("cross_attention")
    monkeypatch.setattr(dispatch, "kernels", lambda name: table if name == "cpp" else original(name))
    q = torch.randn(1, 2, 2, 8)
    with pytest.warns(UserWarning, match="no cpp kernel"):
        out = ops.cross_attention(q, q, q)
    torch.testing.assert_close(out, reference.cross_attention(q, q, q))


def test_resolution_is_cached(monkeypatch):
    monkeypatch.delenv("FASTENCDEC_BACKEND", raising=False)
    first = dispatch.resolve("decode_attention", "cpu")
    calls = []
    monkeypatch.setattr(dispatch, "_resolve_backend", lambda *a: calls.append(a))
    assert dispatch.resolve("decode_attention", "cpu") is first and not calls


def test_summary_lists_every_public_op():
    summary = dispatch.summary("cpu")
    assert set(summary) == {name for name in ops.__all__ if name != "Rope"}
    assert all(v in dispatch.BACKENDS for v in summary.values())


def test_every_backend_kernel_takes_the_schema_arguments():
    """One signature per op: every backend's kernel for an op takes exactly the
    schema's canonical arguments, and the reference implements every op."""
    assert set(dispatch.kernels("reference")) == set(SCHEMAS)
    backends = ["reference", "cpp"]
    if dispatch.triton_usable("cpu") or dispatch.triton_usable("cuda"):
        backends.append("triton")
    for backend in backends:
        for op, kernel in dispatch.kernels(backend).items():
            params = inspect.signature(kernel.fn).parameters.values()
            positional = [p for p in params if p.default is inspect.Parameter.empty]
            assert len(positional) == len(SCHEMAS[op].args), (backend, op)


def test_custom_ops_are_registered():
    for name in SCHEMAS:
        assert hasattr(torch.ops.fastencdec, name), name
    assert set(library.OPS) == set(SCHEMAS)


def test_schema_round_trips_rope():
    spec = ops.Rope(500.0, 2.0, 64, 100)
    schema = SCHEMAS["append_kv_cache"]
    args = tuple(range(6)) + (spec,)
    flat = flatten(schema, args)
    assert len(flat) == 6 + 5
    assert unflatten(schema, flat) == args
    assert unflatten(schema, flatten(schema, tuple(range(6)) + (None,)))[-1] is None
