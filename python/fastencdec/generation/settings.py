"""``generate``'s keyword arguments, checked once (clear errors naming the argument)
and bundled with the token picker and the streamer hooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .sampling import next_tokens


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _token_id(name: str, value, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int token id, got {type(value).__name__}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got {value}")
    return value


def _streamer_hooks(streamer):
    """A callable ``streamer(tokens)``, or an object with ``put(tokens)`` (and optionally
    ``end()``) like Hugging Face's streamers."""
    if streamer is None:
        return None, None
    if hasattr(streamer, "put"):
        return streamer.put, getattr(streamer, "end", None)
    if callable(streamer):
        return streamer, None
    raise TypeError("streamer must be callable or have a put(tokens) method, "
                    f"got {type(streamer).__name__}")


@dataclass
class Settings:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None
    eos_ids: torch.Tensor | None  # int64 on the model's device; None = never stop early
    pad_id: int
    num_return_sequences: int
    emit: Callable | None
    finish: Callable | None

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        return next_tokens(logits, do_sample=self.do_sample, temperature=self.temperature,
                           top_k=self.top_k, top_p=self.top_p, generator=self.generator)


def make_settings(config, device: torch.device, *, max_new_tokens, do_sample, temperature,
                  top_k, top_p, eos_token_id, pad_token_id, num_return_sequences, streamer,
                  generator) -> Settings:
    vocab = config.vocab_size
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("num_return_sequences", num_return_sequences)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None:
        _positive_int("top_k", top_k)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; "
                             "create it with torch.Generator(device=...)")
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(eos, (str, bytes)) or not isinstance(eos, Sequence):
        raise TypeError("eos_token_id must be an int, a sequence of ints or None (config's)")
    eos = [_token_id("eos_token_id", e, vocab) for e in eos]
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    pad = _token_id("pad_token_id", pad, vocab)
    emit, finish = _streamer_hooks(streamer)
    return Settings(
        max_new_tokens=max_new_tokens, do_sample=bool(do_sample), temperature=float(temperature),
        top_k=top_k, top_p=None if top_p is None else float(top_p), generator=generator,
        eos_ids=torch.tensor(eos, dtype=torch.long, device=device) if eos else None,
        pad_id=pad, num_return_sequences=num_return_sequences, emit=emit, finish=finish,
    )


def check_length(name: str, n_positions: int, config, what: str) -> None:
    """Refuse sequences longer than the model's trained context, unless dynamic NTK
    RoPE scaling (``rope_scaling_factor > 1``) is configured to extend it."""
    if config.rope_scaling_factor == 1.0 and n_positions > config.max_position_embeddings:
        raise ValueError(
            f"{name}: {what} needs {n_positions} positions but the model supports "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
