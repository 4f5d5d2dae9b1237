"""Shared test utilities: random inputs, comparisons, reference decoding loops.
Tolerances live in ``fastencdec.constants`` (one table for tests and selfcheck)."""

from __future__ import annotations

import torch

from fastencdec.constants import GRAD_TOLERANCES, TOLERANCES

__all__ = ["TOLERANCES", "GRAD_TOLERANCES", "DISTILL_LARGE_LOGITS_TOLERANCE", "rand",
           "padding_mask", "assert_close", "randomize", "greedy_recompute_encdec",
           "greedy_recompute_decoder_only", "record_one_calls"]

# Distillation loss on fp32 logits of magnitude ~1e4 vs float64 on the same values:
# (atol, rtol, spread). Kept relative to the running max, the loss error is fp32
# rounding of the result (~1e-7 relative); statistics that cancel at 1e4 would be off
# by ~1e-3. The reverse-KL gradient tau*q*((log q - log p) - KL) cancels inherently when
# the log-ratios are ~1e4 apart: its atol is `spread` times the largest gradient.
DISTILL_LARGE_LOGITS_TOLERANCE = (1e-5, 1e-6, 2e-2)


def rand(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0):
    """Standard normal values rounded to `dtype` (generated in float64 first)."""
    x = torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
    return x.to(device=device, dtype=dtype)


def padding_mask(batch, seq_len, *, fully_masked_row=None, device="cpu", generator=None):
    """Right-padded bool mask with random lengths in [1, L]; optionally one row all False."""
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    if fully_masked_row is not None:
        mask[fully_masked_row] = False
    return mask.to(device)


def assert_close(actual, expected, dtype, *, grad=False, name="output"):
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{name}: non-finite"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def randomize(model, std=0.3, embed_std=0.1):
    """Larger-than-init random weights, so outputs depend visibly on every input and
    greedy decoding rarely settles into repeating one token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, embed_std if name.startswith("embed") else std)
    return model.eval()


@torch.no_grad()
def greedy_recompute_encdec(model, ids, mask, n):
    """Greedy decoding that recomputes everything each step, as the reference model
    does (no cache): a generated pad token is masked in the decoder's input."""
    pad = model.config.pad_token_id
    dec = torch.full((ids.shape[0], 1), model.config.bos_token_id)
    for _ in range(n):
        logits = model(ids, mask, decoder_input_ids=dec, decoder_attention_mask=dec != pad).logits
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return dec[:, 1:]


@torch.no_grad()
def greedy_recompute_decoder_only(model, ids, mask, n):
    """The same for a decoder-only model (prompts padded on either side)."""
    out = []
    for _ in range(n):
        nxt = model(ids, mask).logits[:, -1].argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(out, dim=1)


def join_test_group(rank: int, world_size: int, port: int):
    """In a spawned test worker: join a gloo group of ``world_size`` processes on
    localhost:``port`` (one process: no group) and use one thread; returns its DistInfo."""
    import os

    from fastencdec.training import DistInfo, init_distributed

    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        info = init_distributed("cpu")
    else:
        info = DistInfo()
    torch.set_num_threads(1)
    return info


def record_one_calls(monkeypatch, module) -> list[bool]:
    """Patch ``module.run`` (a one-call path: encoder_pass, decoder_prefill, decoder_step)
    to record, per call, whether it ran (True) or left the work to the module path."""
    calls: list[bool] = []
    original = module.run

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, "run", recording)
    return calls
