"""The int8 linear layer's fused row preparation (``_C.scale_rows``) on every ISA this
CPU runs, against the eager expression it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

_C = pytest.importorskip("fastencdec._C")


@pytest.mark.parametrize("shape", [(1, 2), (3, 17), (5, 1024), (64, 37)])
def test_matches_the_eager_expression(isa, seed, shape):
    gen = torch.Generator().manual_seed(seed)
    m, k = shape
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m)[:, None]
    if m > 2:
        x[1] = 0.0
        x[2, k // 2] = float("nan")
    if m > 3:
        x[3, 0] = float("inf")
    xs, r = torch.empty(m + 1, k), torch.empty(m)
    _C.scale_rows(x.numpy(), xs.numpy(), r.numpy(), 2)
    expected_r = x.abs().amax(1)
    finite = torch.isfinite(x).all(1)
    torch.testing.assert_close(r[finite], expected_r[finite], rtol=0, atol=0)
    assert torch.isnan(r[~finite]).all()
    scaled = torch.where((finite & (expected_r > 0))[:, None], x / expected_r[:, None], 0.0)
    torch.testing.assert_close(xs[:m], scaled, rtol=2e-7, atol=0)
    anchor = torch.zeros(k)
    anchor[:2] = torch.tensor([-1.0, 1.0])
    assert torch.equal(xs[m], anchor)


def test_bad_arguments_are_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="xs"):
        _C.scale_rows(x, np.zeros((3, 4), np.float32), np.zeros(3, np.float32), 1)
    with pytest.raises(ValueError, match="2 columns"):
        _C.scale_rows(np.zeros((3, 1), np.float32), np.zeros((4, 1), np.float32),
                      np.zeros(3, np.float32), 1)
    with pytest.raises(TypeError):
        _C.scale_rows(x.astype(np.float64), np.zeros((4, 4), np.float32),
                      np.zeros(3, np.float32), 1)


@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (40, 1000)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_epilogue_matches_torch(isa, seed, shape, gelu, with_bias):
    """``rescale_rows``: y * r + bias, then GELU(tanh) as torch computes it; NaN stays."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    y = torch.randn(m, n, generator=gen) * 3
    r = torch.rand(m, generator=gen) * 4
    if m > 2:
        r[1] = float("nan")
    bias = torch.randn(n, generator=gen) if with_bias else None
    expected = y * r[:, None] + (bias if with_bias else 0.0)
    if gelu:
        expected = torch.nn.functional.gelu(expected, approximate="tanh")
    got = y.clone()
    _C.rescale_rows(got.numpy(), r.numpy(), None if bias is None else bias.numpy(), gelu, 2)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6, equal_nan=True)
