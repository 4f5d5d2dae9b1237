"""Random op calls, valid and invalid, on every backend usable here: every backend
makes the same accept/refuse decision, and accepted results match the reference.

At least 300 cases with a fresh seed each run (``FASTENCDEC_TEST_SEED`` replays one).
Shapes are tiny (the Triton backend runs under its CPU interpreter); mutations cover
the ways a call can go wrong: wrong rank/shape/dtype/device-free objects, mismatched
heads, bad masks, bad RoPE settings (0, negative, NaN, inf theta; NaN scaling),
non-finite scales, cache lengths out of range, self-aliasing (expanded) caches,
bad labels and loss settings.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from fastencdec import ops, reference
from fastencdec.constants import TOLERANCES
from fastencdec.ops import dispatch

N_CASES = 320
BACKENDS = ["reference", "cpp"] + (["triton"] if dispatch.triton_usable("cpu") else [])


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _attention_case(rng, gen, op):
    b, hkv = rng.randint(1, 2), rng.choice([1, 2])
    hq = hkv * rng.choice([1, 2, 3])
    d = rng.choice([32, 32, 64, 16, 7])
    lq = rng.randint(1, 9)
    lk = lq if op == "self_attention" else rng.randint(1, 11)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.float64])
    q, k, v = _rand(gen, b, lq, hq, d, dtype=dtype), _rand(gen, b, lk, hkv, d, dtype=dtype), \
        _rand(gen, b, lk, hkv, d, dtype=dtype)
    kwargs = {}
    if rng.random() < 0.5:
        mask = torch.rand(b, lk, generator=gen) < 0.7
        if rng.random() < 0.2:
            mask[0] = False
        kwargs["key_padding_mask"] = mask
    if rng.random() < 0.3:
        kwargs["scale"] = rng.choice([0.1, 1.0, 2.5, float("inf"), float("nan"), -0.5])
    if op == "self_attention":
        kwargs["causal"] = rng.random() < 0.5
        if rng.random() < 0.5:
            kwargs["positions"] = rng.choice([0, 3, -1, torch.tensor(2),
                                              torch.randint(0, 50, (b, lq), generator=gen)])
        if rng.random() < 0.3:
            kwargs["rope"] = False
        elif rng.random() < 0.4:
            kwargs["rope_theta"] = rng.choice([500.0, 0.0, -10.0, float("nan"), float("inf")])
        elif rng.random() < 0.3:
            kwargs["rope_scaling_factor"] = rng.choice([2.0, float("nan"), 0.5])
            kwargs["max_position_embeddings"] = rng.choice([4, None, 0])
    args = [q, k, v]
    mutation = rng.random()
    if mutation < 0.05:
        args[0] = q[0]  # wrong rank
    elif mutation < 0.1:
        args[1] = k.to(torch.float32 if dtype != torch.float32 else torch.float16)
    elif mutation < 0.13:
        args[2] = v[:, :, :, : max(d - 1, 1)]
    elif mutation < 0.16 and "key_padding_mask" in kwargs:
        kwargs["key_padding_mask"] = kwargs["key_padding_mask"].int()
    return getattr(ops, op), getattr(reference, op), args, kwargs, dtype


def _decode_case(rng, gen, op):
    b, hkv = rng.randint(1, 3), rng.choice([1, 2])
    hq, d, lmax = hkv * rng.choice([1, 2]), rng.choice([32, 64, 8]), rng.randint(1, 12)
    t = rng.randint(1, 3)
    dtype = rng.choice([torch.float32, torch.float16])
    q, k, v = (_rand(gen, b, t, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    kc, vc = _rand(gen, b, lmax, hkv, d, dtype=dtype), _rand(gen, b, lmax, hkv, d, dtype=dtype)
    hi = lmax - t if op == "append_kv_cache" else lmax
    lens = torch.randint(0, max(hi, 0) + 1, (b,), generator=gen)
    if rng.random() < 0.15:
        lens[0] = rng.choice([lmax + 1, -1, lmax])  # out of range (or exactly full)
    if rng.random() < 0.3:
        lens = lens.to(torch.int32)
    if op == "decode_attention":
        kwargs = {}
        if rng.random() < 0.3:
            kwargs["key_padding_mask"] = torch.rand(b, lmax, generator=gen) < 0.8
        return ops.decode_attention, reference.decode_attention, [q, kc, vc, lens], kwargs, dtype
    kwargs = {}
    if rng.random() < 0.3:
        kwargs["rope"] = False
    elif rng.random() < 0.3:
        kwargs["rope_theta"] = rng.choice([50.0, 0.0, float("inf")])
    if rng.random() < 0.1:  # a cache whose rows alias one another
        kc = kc[:1].expand(b, lmax, hkv, d)
    return ops.append_kv_cache, reference.append_kv_cache, [q, k, v, kc, vc, lens], kwargs, dtype


def _distill_case(rng, gen, op):
    n, dm, vs = rng.randint(1, 9), rng.choice([8, 16]), rng.randint(5, 40)
    vt = vs + rng.choice([-2, 0, 7])
    labels = torch.randint(0, vs, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.3] = -100
    if rng.random() < 0.1:
        labels[0] = vs  # out of range
    kwargs = dict(alpha=rng.choice([0.0, 0.5, 1.0, 0.3, 1.5]),
                  temperature=rng.choice([1.0, 2.0, 0.5, float("inf"), 0.0]),
                  divergence=rng.choice(["reverse_kl", "forward_kl"]))
    teacher = _rand(gen, n, vt)
    if rng.random() < 0.15:
        teacher[0] = float("nan")  # a term weighted 0 must not read it
    if op == "distill_loss_from_logits":
        return (ops.distill_loss_from_logits, reference.distill_loss_from_logits,
                [_rand(gen, n, vs), teacher, labels], kwargs, torch.float32)
    hidden, weight = _rand(gen, n, dm), _rand(gen, vs, dm)
    return ops.distill_loss, reference.distill_loss, [hidden, weight, teacher, labels], kwargs, \
        torch.float32


def _rope_case(rng, gen, op):
    b, length, h, d = rng.randint(1, 2), rng.randint(1, 8), rng.randint(1, 3), rng.choice([8, 32, 5])
    x = _rand(gen, b, length, h, d)
    kwargs = {}
    if rng.random() < 0.4:
        kwargs["theta"] = rng.choice([100.0, 0.0, float("nan")])
    pos = rng.choice([None, 0, 4, -2, torch.randint(0, 30, (b, length), generator=gen)])
    return ops.apply_rope, reference.apply_rope, [x, pos], kwargs, torch.float32


def _norm_case(rng, gen, op):
    shape = rng.choice([(1, 16), (2, 3, 40), (5, 7), (1, 1, 1)])
    dtype = rng.choice([torch.float32, torch.float16, torch.float64])
    x = _rand(gen, *shape, dtype=dtype)
    weight = _rand(gen, shape[-1] if rng.random() > 0.1 else shape[-1] + 1)
    eps = rng.choice([1e-6, 1e-5, 0.0, float("nan"), -1.0])
    return ops.rms_norm, reference.rms_norm, [x, weight, eps], {}, dtype


MAKERS = {
    "rms_norm": _norm_case,
    "self_attention": _attention_case,
    "cross_attention": _attention_case,
    "decode_attention": _decode_case,
    "append_kv_cache": _decode_case,
    "distill_loss": _distill_case,
    "distill_loss_from_logits": _distill_case,
    "apply_rope": _rope_case,
}


def _call(backend, fn, args, kwargs, monkeypatch):
    """(outcome, result): the exception class name on refusal, else "ok" and outputs."""
    monkeypatch.setenv("FASTENCDEC_BACKEND", backend)
    args = [a.clone() if isinstance(a, torch.Tensor) and a.stride() != () and
            a.is_contiguous() else a for a in args]  # append writes its caches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(*args, **kwargs)
        except (ValueError, TypeError) as err:
            return type(err).__name__, str(err)
    extra = tuple(a for a in args[3:5] if isinstance(a, torch.Tensor)) \
        if fn is ops.append_kv_cache else ()
    return "ok", (out,) + extra


def _tolerance(dtype):
    atol, rtol = TOLERANCES[torch.float16 if dtype == torch.float16 else torch.float32]
    return atol * 5, rtol * 5


def test_backends_agree_on_random_calls(seed, monkeypatch, one_thread):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ops_names = list(MAKERS)
    disagreements, mismatches = [], []
    for case in range(N_CASES):
        op = ops_names[case % len(ops_names)]
        fn, _, args, kwargs, dtype = MAKERS[op](rng, gen, op)
        outcomes = {b: _call(b, fn, args, kwargs, monkeypatch) for b in BACKENDS}
        kinds = {b: o[0] for b, o in outcomes.items()}
        if len(set(kinds.values())) > 1:
            disagreements.append((case, op, kinds, {b: str(o[1])[:120] for b, o in
                                                   outcomes.items() if o[0] != "ok"}))
            continue
        if kinds["reference"] != "ok":
            continue
        expected = outcomes["reference"][1]
        atol, rtol = _tolerance(dtype)
        for b in BACKENDS[1:]:
            for got, want in zip(outcomes[b][1], expected, strict=True):
                same_nan = torch.equal(torch.isnan(got), torch.isnan(want))
                close = same_nan and torch.allclose(
                    got.double().nan_to_num(0.0), want.double().nan_to_num(0.0),
                    atol=atol, rtol=rtol)
                if not close:
                    diff = (got.double() - want.double()).abs().nan_to_num(math.inf).max()
                    mismatches.append((case, op, b, float(diff)))
    assert not disagreements, f"{len(disagreements)} calls decided differently: {disagreements[:3]}"
    assert not mismatches, f"{len(mismatches)} results differ from the reference: {mismatches[:5]}"


@pytest.mark.parametrize("op", sorted(MAKERS))
def test_fuzz_generators_produce_both_outcomes(op):
    """The fuzz is not vacuous: each op's case generator yields accepted and refused calls."""
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        fn, _, args, kwargs, _ = MAKERS[op](rng, gen, op)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(*[a.clone() if isinstance(a, torch.Tensor) and a.is_contiguous() else a
                     for a in args], **kwargs)
            seen.add("ok")
        except (ValueError, TypeError):
            seen.add("refused")
        if len(seen) == 2:
            break
    assert seen == {"ok", "refused"}
