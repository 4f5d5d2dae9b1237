"""Run every op through each kernel backend usable here and compare with the reference.

Used by ``fastencdec selfcheck`` / ``fastencdec demo``: a quick end-to-end proof
that the compiled and Triton kernels on this machine agree with
``fastencdec.reference``. A case fails when its result is off, and also when the
kernel did not run at all (the op fell back to the reference): a self-check that
compares the reference with itself proves nothing.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import ops, reference
from .constants import TOLERANCES
from .ops import dispatch

__all__ = ["run", "SelfCheckError"]


class SelfCheckError(RuntimeError):
    """The self-check cannot run as asked (e.g. ``device="cuda"`` without CUDA)."""


@contextlib.contextmanager
def _forced(backend: str):
    old = os.environ.get(dispatch.ENV_VAR)
    os.environ[dispatch.ENV_VAR] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = old


@contextlib.contextmanager
def _recording_backends(ran: list[tuple[str, str]]):
    """Record ``(op, backend)`` for every op run inside the block."""
    resolve = dispatch.resolve

    def recording(op, device_type, args=None):
        found = resolve(op, device_type, args)
        if args is not None:
            ran.append((op, found[0]))
        return found

    dispatch.resolve = recording
    try:
        yield
    finally:
        dispatch.resolve = resolve


def _cases(device, dtype, gen):
    """(name, fn(module) -> tensor or tuple) pairs; ``module`` is ``ops`` or ``reference``."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device,
                                                                          dtype=dtype)

    b, lq, lk, hq, hkv, d = 2, 37, 45, 6, 3, 64
    q, k, v = rnd(b, lq, hq, d), rnd(b, lq, hkv, d), rnd(b, lq, hkv, d)
    ke, ve = rnd(b, lk, hkv, d), rnd(b, lk, hkv, d)
    mask = torch.ones(b, lq, dtype=torch.bool, device=device)
    mask[1, 30:] = False
    emask = torch.ones(b, lk, dtype=torch.bool, device=device)
    emask[0, 40:] = False
    kc, vc = rnd(b, 64, hkv, d), rnd(b, 64, hkv, d)
    lens = torch.tensor([17, 61], device=device, dtype=torch.int32)
    n, vocab, dm = 50, 300, 32
    hidden, w = rnd(n, dm), rnd(vocab, dm)
    teacher = rnd(n, vocab + 20)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    labels[::7] = -100

    def append_then_decode(m):
        k_cache, v_cache = kc.clone(), vc.clone()
        q_rot = m.append_kv_cache(q[:, :3], k[:, :3], v[:, :3], k_cache, v_cache, lens)
        return q_rot, k_cache, m.decode_attention(q_rot, k_cache, v_cache, lens + 3)

    yield "apply_rope", lambda m: m.apply_rope(q, 5)
    yield "rms_norm", lambda m: m.rms_norm(q, rnd(d), 1e-6)
    yield "self_attention causal", lambda m: m.self_attention(
        q, k, v, causal=True, key_padding_mask=mask, positions=3)
    yield "self_attention bidirectional", lambda m: m.self_attention(
        q, k, v, causal=False, key_padding_mask=mask)
    yield "cross_attention", lambda m: m.cross_attention(q, ke, ve, key_padding_mask=emask)
    yield "decode_attention", lambda m: m.decode_attention(q[:, :1], kc, vc, lens)
    yield "append_kv_cache + decode", append_then_decode
    yield "distill_loss", lambda m: m.distill_loss(hidden, w, teacher, labels, alpha=0.5,
                                                   temperature=2.0)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def run(device: str = "cpu", verbose: bool = True) -> bool:
    """Check every kernel backend usable on ``device``; True when all agree and ran."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SelfCheckError("selfcheck --device cuda: CUDA is not available on this machine "
                             "(no GPU, or a CPU build of torch)")
    if dev.type not in ("cpu", "cuda"):
        raise SelfCheckError(f"selfcheck: device must be cpu or cuda, got {device!r}")
    backends = [b for b in ("cpp", "triton") if dispatch.backend_usable(b, dev.type)]
    if not backends:
        raise SelfCheckError(f"selfcheck: no kernel backend can run on {dev.type} here "
                             "(the C++ module did not load and Triton is unavailable)")
    dtype = torch.float32
    atol, rtol = TOLERANCES[dtype]
    all_ok = True
    for backend in backends:
        gen = torch.Generator().manual_seed(0)
        cases = list(_cases(dev, dtype, gen))
        gen64 = torch.Generator().manual_seed(0)
        cases64 = dict(_cases(dev, torch.float64, gen64))
        for name, fn in cases:
            expected = _as_tuple(cases64[name](reference))
            ran: list[tuple[str, str]] = []
            with _forced(backend), _recording_backends(ran), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = _as_tuple(fn(ops))
            err = max(((g.double() - e.double()).abs().max().item() if g.numel() else 0.0)
                      for g, e in zip(got, expected, strict=True))
            close = all(torch.allclose(g.double(), e.double(), atol=atol, rtol=rtol)
                        for g, e in zip(got, expected, strict=True))
            table = dispatch.kernels(backend)
            fell_back = [op for op, used in ran if used != backend and op in table]
            missing = sorted({op for op, _ in ran if op not in table})
            ok = close and bool(ran) and not fell_back
            all_ok &= ok
            if verbose:
                if not close:
                    status = "FAILED"
                elif fell_back or not ran:
                    status = f"FAILED ({', '.join(fell_back) or 'nothing'} fell back to the " \
                             "reference)"
                elif missing:
                    status = f"ok (no {backend} kernel for {', '.join(missing)}: reference)"
                else:
                    status = "ok"
                print(f"  {backend:<7} {name:<30} max|err| = {err:.2e}  {status}")
    return all_ok
