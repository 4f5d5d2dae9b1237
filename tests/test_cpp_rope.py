"""The C++ RoPE kernel against the reference, on every ISA this CPU runs, and its guards."""

import numpy as np
import pytest
import torch

from _helpers import assert_close, rand
from fastencdec import ops, reference

_C = pytest.importorskip("fastencdec._C")


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 7, 3, 32), (1, 129, 2, 80), (3, 5, 4, 128)])
def test_matches_reference(isa, backend, seed, shape):
    backend("cpp")
    x = rand(*shape)
    positions = torch.randint(0, 5000, shape[:2])
    for pos in (0, 37, positions):
        assert_close(ops.apply_rope(x, pos, theta=5000.0),
                     reference.apply_rope(x.double(), pos, theta=5000.0), torch.float32)


def test_ntk_scaling(backend, seed):
    backend("cpp")
    x = rand(1, 300, 2, 64)
    kw = dict(theta=10000.0, scaling_factor=2.0, max_position_embeddings=128)
    assert_close(ops.apply_rope(x, 0, **kw), reference.apply_rope(x.double(), 0, **kw),
                 torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(backend, seed, dtype):
    backend("cpp")
    x = rand(2, 9, 2, 16, dtype=dtype)
    out = ops.apply_rope(x, 3)
    assert out.dtype == dtype
    assert_close(out, reference.apply_rope(x.double(), 3), dtype)


def test_threads_agree(backend, seed):
    backend("cpp")
    x = rand(4, 33, 3, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.apply_rope(x, 11)
        torch.set_num_threads(2)
        two = ops.apply_rope(x, 11)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_non_contiguous_input(backend, seed):
    backend("cpp")
    x = rand(2, 8, 3, 16).transpose(1, 2)  # [2, 3, 8, 16] viewed; not contiguous
    assert_close(ops.apply_rope(x, 1), reference.apply_rope(x.double(), 1), torch.float32)


def test_inverse_undoes_the_rotation(isa, backend, seed):
    backend("cpp")
    x = torch.randn(2, 9, 3, 16)
    turned = ops.apply_rope(x, 5, theta=500.0)
    assert_close(ops.apply_rope(turned, 5, theta=500.0, inverse=True), x.double(), torch.float32)
    assert_close(ops.apply_rope(x, 5, theta=500.0, inverse=True),
                 reference.apply_rope(x.double(), 5, theta=500.0, inverse=True), torch.float32)


def test_binding_rejects_bad_arrays():
    x = np.zeros((4, 2, 8), dtype=np.float32)
    pos = np.zeros(4, dtype=np.int64)
    out = np.zeros_like(x)
    with pytest.raises(TypeError, match="dtype"):
        _C.apply_rope(x.astype(np.float64), pos, 10000.0, out, False, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.apply_rope(np.zeros((8, 2, 4), dtype=np.float32).transpose(2, 1, 0), pos, 1e4, out,
                      False, 1)
    with pytest.raises(ValueError, match="positions"):
        _C.apply_rope(x, np.zeros(3, dtype=np.int64), 10000.0, out, False, 1)
    with pytest.raises(ValueError, match="out"):
        _C.apply_rope(x, pos, 10000.0, np.zeros((4, 2, 6), dtype=np.float32), False, 1)
    with pytest.raises(ValueError, match="even"):
        _C.apply_rope(np.zeros((4, 2, 7), np.float32), pos, 1e4,
                      np.zeros((4, 2, 7), np.float32), False, 1)
    readonly = np.zeros_like(x)
    readonly.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _C.apply_rope(x, pos, 10000.0, readonly, False, 1)
    with pytest.raises(ValueError, match="num_threads"):
        _C.apply_rope(x, pos, 10000.0, out, False, 0)


def test_bad_isa_request(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_CPU_ISA", "sse9")
    _C.reset_isa()
    try:
        with pytest.raises(ValueError, match="FASTENCDEC_CPU_ISA"):
            _C.active_isa()
    finally:
        monkeypatch.delenv("FASTENCDEC_CPU_ISA")
        _C.reset_isa()
