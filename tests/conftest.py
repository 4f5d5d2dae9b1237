"""Test setup: Triton's interpreter without a GPU, a ``gpu`` marker, fresh seeds, and
the per-ISA fixture of the C++ kernel tests."""

import os
import random

import pytest
import torch

# Must happen before any Triton kernel is defined (kernel modules are imported lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


try:  # after TRITON_INTERPRET: importing fastencdec may define kernels
    from fastencdec import _C as _CPP

    RUNNABLE_ISAS = [n for n in _CPP.compiled_isas().split(",") if _CPP.cpu_supports(n)]
except ImportError:
    _CPP, RUNNABLE_ISAS = None, []


@pytest.fixture(params=RUNNABLE_ISAS or [None])
def isa(request, monkeypatch):
    """Each instruction set the C++ kernels were built for and this CPU runs, made the
    active one for the test (``FASTENCDEC_CPU_ISA``)."""
    if _CPP is None:
        pytest.skip("fastencdec._C is not built")
    monkeypatch.setenv("FASTENCDEC_CPU_ISA", request.param)
    _CPP.reset_isa()
    assert _CPP.active_isa() == request.param
    yield request.param
    monkeypatch.delenv("FASTENCDEC_CPU_ISA", raising=False)
    _CPP.reset_isa()  # re-read lazily from the restored environment


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """A fresh random seed per test (reported on failure); torch/random are seeded with it.

    Set FASTENCDEC_TEST_SEED to replay a failure.
    """
    value = int(os.environ.get("FASTENCDEC_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(
                ("fastencdec seed", f"replay with FASTENCDEC_TEST_SEED={seeds[0]}")
            )


@pytest.fixture
def backend(monkeypatch):
    """Force a backend for one test: ``backend("triton")``."""

    def force(name: str):
        monkeypatch.setenv("FASTENCDEC_BACKEND", name)

    return force


@pytest.fixture
def poison_alloc(monkeypatch):
    """Make fresh float buffers (``torch.empty``/``empty_like``) NaN, so an element a
    kernel forgets to write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.fixture(params=[1, 2])
def threads(request):
    """torch's thread count set to 1, then 2, for the test (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: each op is microseconds of work, so a second thread only adds its
    synchronisation (which costs milliseconds on a loaded machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
