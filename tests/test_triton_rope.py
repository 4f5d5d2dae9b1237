"""The Triton RoPE pass (``kernels/rope.py``): ``ops.apply_rope`` on the Triton backend
against the float64 reference, forward and inverse, every positions form, dynamic
NTK, autograd, in place, and the attention launchers' use of it (K rotated once).
CPU runs use Triton's interpreter; fresh buffers are NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch
from fastencdec.kernels import attention_setup
from fastencdec.kernels import rope as rope_kernel

import fastencdec.ops as ops
import fastencdec.reference as ref
from _helpers import assert_close, rand
from fastencdec.ops import dispatch
from fastencdec.spec import Rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16 = torch.float32, torch.float16


@pytest.fixture(autouse=True)
def triton_backend(backend, poison_alloc):
    backend("triton")


@pytest.fixture
def rope_calls(monkeypatch):
    """Count launches of the RoPE pass (proof that the Triton kernel ran)."""
    calls = []
    original = rope_kernel.rotate

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(rope_kernel, "rotate", counted)
    return calls


def _positions(kind, batch, seq_len):
    if kind == "none":
        return None
    if kind == "offset":
        return int(torch.randint(0, 5000, ()).item())
    shift = torch.randint(0, 3000, (batch, 1))
    return (torch.arange(seq_len) + shift).to(DEVICE)


# (B, L, H, D, positions, theta / NTK, inverse, dtype)
CASES = [
    (2, 7, 3, 64, "offset", {}, False, F32),
    (1, 33, 2, 128, "tensor", {"theta": 500.0}, True, F16),
    (3, 65, 4, 80, "none", {}, False, F16),
    (2, 20, 1, 96, "tensor", {"scaling_factor": 2.0, "max_position_embeddings": 16}, False, F32),
    (2, 9, 2, 32, "offset", {"scaling_factor": 4.0, "max_position_embeddings": 8}, True, F32),
    (1, 5, 2, 256, "tensor", {}, False, F16),
]


@pytest.mark.parametrize("batch,seq_len,heads,head_dim,pos_kind,settings,inverse,dtype", CASES)
def test_apply_rope_matches_reference(seed, rope_calls, batch, seq_len, heads, head_dim,
                                      pos_kind, settings, inverse, dtype):
    x = rand(batch, seq_len, heads, head_dim, dtype=dtype, device=DEVICE, scale=3.0)
    pos = _positions(pos_kind, batch, seq_len)
    out = ops.apply_rope(x, pos, inverse=inverse, **settings)
    expected = ref.apply_rope(x.double(), pos, inverse=inverse, **settings)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    assert rope_calls == [tuple(x.shape)]


def test_inverse_undoes_forward_and_gradient_is_inverse(seed):
    x = rand(2, 17, 3, 64, device=DEVICE).requires_grad_()
    pos = torch.randint(0, 900, (2, 17), device=DEVICE)
    y = ops.apply_rope(x, pos, theta=1000.0)
    back = ops.apply_rope(y.detach(), pos, theta=1000.0, inverse=True)
    torch.testing.assert_close(back, x.detach(), atol=2e-5, rtol=2e-5)
    grad = rand(*y.shape, device=DEVICE)
    y.backward(grad)
    assert_close(x.grad, ref.apply_rope(grad.double(), pos, theta=1000.0, inverse=True), F32)


def test_rotate_in_place_and_strided_input(seed):
    """In place (out is x) and a non-contiguous x (a head slice) give the same rotation."""
    wide = rand(2, 11, 5, 64, device=DEVICE)
    before = wide.clone()
    x = wide[:, :, 1:4]
    cos, sin, stride_b = attention_setup.rope_tables(None, 3, 2, 11, 64, x.device, F32,
                                                     Rope(10000.0))
    expected = ref.apply_rope(x.double(), 3)
    out = rope_kernel.rotate(x, cos, sin, stride_b)
    assert out.is_contiguous()
    assert_close(out, expected, F32)
    rope_kernel.rotate(x, cos, sin, stride_b, out=x)
    assert_close(wide[:, :, 1:4], expected, F32)
    assert torch.equal(wide[:, :, 0], before[:, :, 0])  # heads outside the view: untouched
    assert torch.equal(wide[:, :, 4], before[:, :, 4])
    with pytest.raises(ValueError, match="unit stride"):
        rope_kernel.rotate(wide[..., ::2], cos, sin, stride_b)


def test_attention_rotates_k_once_per_call(seed, rope_calls, monkeypatch):
    """Forward rotates K once (q is rotated in the kernel's prologue); backward rotates
    Q and K once each (dQ/dK go back in the store epilogues; a split GQA group would
    add one inverse pass over the summed dK partials, so it is kept whole here);
    rope=False rotates nothing."""
    from fastencdec.ops.backends import triton as tb

    monkeypatch.setenv(tb.GROUP_SPLITS_ENV_VAR, "1")
    q = rand(2, 40, 4, 32, device=DEVICE).requires_grad_()
    k = rand(2, 40, 2, 32, device=DEVICE).requires_grad_()
    v = rand(2, 40, 2, 32, device=DEVICE).requires_grad_()
    out = ops.self_attention(q, k, v, causal=True, positions=5)
    assert rope_calls == [tuple(k.shape)]
    out.backward(torch.ones_like(out))
    assert rope_calls == [tuple(k.shape), tuple(q.shape), tuple(k.shape)]
    rope_calls.clear()
    ops.self_attention(q.detach(), k.detach(), v.detach(), causal=True, rope=False)
    assert rope_calls == []


def test_apply_rope_unsupported_dtype_falls_back(seed):
    dispatch.clear_cache()
    x = rand(1, 4, 2, 32, dtype=torch.float64, device=DEVICE)
    with pytest.warns(UserWarning, match="float64"):
        out = ops.apply_rope(x, 2)
    assert_close(out, ref.apply_rope(x, 2), torch.float64)
