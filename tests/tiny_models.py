"""Tiny text models and data shared by the trainer tests (imported as a sibling module,
like ``mu_reference_model``): an encoder-decoder and its decoder-only twin over a 64-id
vocabulary, seeded so that each call gives the same weights, and random seq2seq
examples with a length-bucketed stream over them."""

from __future__ import annotations

import torch

from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM
from fastencdec.data import BatchStream, LengthBucketBatchSampler, Seq2SeqCollator

__all__ = ["VOCAB", "tiny_encdec", "tiny_decoder_only", "tiny_teacher", "examples", "stream"]

VOCAB = 64


def tiny_encdec(seed: int = 0, **changes) -> EncoderDecoderLM:
    """The ``tiny`` preset with ``VOCAB`` ids (``changes``: other config fields)."""
    torch.manual_seed(seed)
    return EncoderDecoderLM(EncDecConfig.preset("tiny").replace(vocab_size=VOCAB, **changes))


def tiny_decoder_only(seed: int = 1) -> DecoderOnlyLM:
    """The decoder-only twin of :func:`tiny_encdec` (the same parameter budget)."""
    torch.manual_seed(seed)
    return DecoderOnlyLM(DecoderOnlyConfig.twin_of(
        EncDecConfig.preset("tiny").replace(vocab_size=VOCAB)))


def tiny_teacher(seed: int = 1) -> DecoderOnlyLM:
    """A decoder-only distillation teacher (the same model as :func:`tiny_decoder_only`)."""
    return tiny_decoder_only(seed)


def examples(n: int = 16, seed: int = 0) -> list[dict]:
    """``n`` random pairs: 3-9 source ids, 1-4 target ids then EOS (2); ids >= 5."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        src = torch.randint(5, VOCAB, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
        tgt = torch.randint(5, VOCAB, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
        out.append({"input_ids": src.tolist(), "labels": tgt.tolist() + [2]})
    return out


def stream(exs, batch_size: int = 4, collate=None, seed: int = 0) -> BatchStream:
    """Length-bucketed batches of ``exs`` (``collate`` defaults to ``Seq2SeqCollator``)."""
    sampler = LengthBucketBatchSampler([len(e["input_ids"]) for e in exs], batch_size, seed=seed)
    return BatchStream(exs, sampler, collate or Seq2SeqCollator())
