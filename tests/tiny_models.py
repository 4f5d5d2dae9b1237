"""Tiny text models shared by the trainer tests (imported as a sibling module, like
``mu_reference_model``): an encoder-decoder and its decoder-only twin over a 64-id
vocabulary, seeded so that each call gives the same weights."""

from __future__ import annotations

import torch

from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM

__all__ = ["VOCAB", "tiny_encdec", "tiny_decoder_only", "tiny_teacher"]

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
