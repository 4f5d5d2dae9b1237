"""``fastencdec selfcheck``: passes here, and fails when a kernel silently does not run."""

import dataclasses

import pytest
import torch

from fastencdec import selfcheck
from fastencdec.ops import dispatch


@pytest.fixture(autouse=True)
def fresh_dispatch(one_thread):
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def test_every_kernel_agrees_here(capsys):
    assert selfcheck.run("cpu")
    out = capsys.readouterr().out
    assert "cpp" in out and "append_kv_cache + decode" in out and "FAILED" not in out


def test_a_kernel_that_falls_back_fails_the_check(monkeypatch, capsys):
    table = dict(dispatch.kernels("cpp"))
    table["decode_attention"] = dataclasses.replace(
        table["decode_attention"], unsupported=lambda *args: "refused for the test")
    original = dispatch.kernels
    monkeypatch.setattr(dispatch, "kernels", lambda b: table if b == "cpp" else original(b))
    assert not selfcheck.run("cpu")
    assert "decode_attention fell back to the reference" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(selfcheck.SelfCheckError, match="CUDA is not available"):
        selfcheck.run("cuda")
