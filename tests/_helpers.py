"""Shared test utilities: tolerances (stated once), random inputs, comparisons."""

from __future__ import annotations

import torch

# (atol, rtol) for a kernel output in `dtype` vs the float64 reference. Attention
# outputs and gradients are O(1); fp16/bf16 round inputs and the P@V product.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# Gradients accumulate over the sequence: looser.
GRAD_TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (5e-4, 5e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
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
