"""Next-token choice in numpy, as ``fastencdec.generation.next_tokens`` does in torch:
greedy takes the first maximum; sampling draws from ``softmax(filtered logits /
temperature)`` (top-k keeps ties at the threshold; top-p keeps the smallest set of most
likely tokens reaching ``top_p``, the most likely always)."""

from __future__ import annotations

import numpy as np


def as_float(logits: np.ndarray) -> np.ndarray:
    """fp32 logits, or bf16 logits (uint16 bits) widened to fp32."""
    if logits.dtype == np.uint16:
        return (logits.astype(np.uint32) << 16).view(np.float32)
    return logits


def filter_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    if top_k >= logits.shape[-1]:
        return logits
    kth = -np.partition(-logits, top_k - 1, axis=-1)[:, top_k - 1:top_k]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    if top_p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    ordered = np.take_along_axis(logits, order, -1)
    probs = softmax(ordered)
    mass_before = np.cumsum(probs, -1) - probs
    ordered = np.where(mass_before >= top_p, -np.inf, ordered)
    out = np.empty_like(logits)
    np.put_along_axis(out, order, ordered, -1)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def next_tokens(logits: np.ndarray, *, do_sample: bool, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """``logits`` ``[R, vocab]`` (fp32 or bf16 bits) -> token ids ``[R]`` (int64)."""
    logits = as_float(logits)
    if not do_sample:
        return logits.argmax(-1).astype(np.int64)
    logits = logits.astype(np.float32) / np.float32(temperature)  # fp32, as torch
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = softmax(logits.astype(np.float64))
    if not np.isfinite(probs).all():
        raise ValueError("sampling: the logits hold NaN or Inf (no distribution to draw from)")
    cdf = np.cumsum(probs, -1)
    # u in (0, 1]: the first index whose cdf reaches u * total has a positive probability
    u = 1.0 - (rng if rng is not None else np.random.default_rng()).random((logits.shape[0], 1))
    picked = (cdf < u * cdf[:, -1:]).sum(-1)
    return np.minimum(picked, logits.shape[-1] - 1).astype(np.int64)
