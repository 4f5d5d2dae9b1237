"""Run every op through each usable backend and compare with the reference.

Used by ``fastencdec selfcheck`` / ``fastencdec demo``: a quick end-to-end proof
that the compiled and Triton kernels on this machine agree with fastencdec.reference.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import ops, reference
from .ops import dispatch

# (atol, rtol) per compute dtype when a kernel is compared with the float64 reference.
TOLERANCES = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


@contextlib.contextmanager
def forced(backend: str):
    old = os.environ.get(dispatch.ENV_VAR)
    os.environ[dispatch.ENV_VAR] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = old


def _cases(device, dtype, gen):
    def rnd(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x.to(device=device, dtype=dtype)

    b, lq, lk, hq, hkv, d = 2, 37, 45, 6, 3, 64
    q, k, v = rnd(b, lq, hq, d), rnd(b, lq, hkv, d), rnd(b, lq, hkv, d)
    ke, ve = rnd(b, lk, hkv, d), rnd(b, lk, hkv, d)
    mask = torch.ones(b, lq, dtype=torch.bool, device=device)
    mask[1, 30:] = False
    emask = torch.ones(b, lk, dtype=torch.bool, device=device)
    emask[0, 40:] = False
    kc, vc = rnd(b, 64, hkv, d), rnd(b, 64, hkv, d)
    lens = torch.tensor([17, 64], device=device, dtype=torch.int32)
    yield "apply_rope", (q, 5), {}
    yield "self_attention", (q, k, v), dict(causal=True, key_padding_mask=mask, positions=3)
    yield "self_attention", (q, k, v), dict(causal=False, key_padding_mask=mask)
    yield "cross_attention", (q, ke, ve), dict(key_padding_mask=emask)
    yield "decode_attention", (q[:, :1], kc, vc, lens), {}
    n, vocab, dm = 50, 300, 32
    hidden, w = rnd(n, dm), rnd(vocab, dm)
    teacher = rnd(n, vocab + 20)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    labels[::7] = -100
    yield "distill_loss", (hidden, w, teacher, labels), dict(alpha=0.5, temperature=2.0)


def run(device: str = "cpu", verbose: bool = True) -> bool:
    dev = torch.device(device)
    backends = ["cpp"] if dev.type == "cpu" else []
    if dispatch.triton_usable(dev.type):
        backends.append("triton")
    gen = torch.Generator().manual_seed(0)
    all_ok = True
    for backend in backends:
        dtype = torch.float32
        for op, args, kwargs in _cases(dev, dtype, gen):
            if backend not in dispatch.KERNELS[op]:
                if verbose:
                    print(f"  {backend:<9} {op:<18} (no kernel yet: reference path)")
                continue
            ref_args = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                        for a in args]
            ref = getattr(reference, op)(*ref_args, **kwargs)
            with forced(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = getattr(ops, op)(*args, **kwargs)
            atol, rtol = TOLERANCES[dtype]
            err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
            ok = torch.allclose(out.double(), ref, atol=atol, rtol=rtol)
            all_ok &= ok
            if verbose:
                print(f"  {backend:<9} {op:<18} max|err| = {err:.2e}  {'ok' if ok else 'FAILED'}")
    return all_ok
