"""Argument checks shared by every module, torch-free (the runtime uses them too): the one
check for integer arguments (counts, sizes, limits), the softmax temperature, and a
generation streamer.

A bool is not an int here (``True`` as a batch size is a bug), numpy integers are
accepted and returned as ``int``, and the error names the argument and the range.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["ArgumentTypeError", "int_at_least", "positive_int", "MIN_TEMPERATURE",
           "temperature", "streamer_hooks", "token_id"]


class ArgumentTypeError(TypeError, ValueError):
    """A wrong type for an integer argument; a ``TypeError`` that older callers may
    also catch as the ``ValueError`` these checks used to raise."""


def _wanted(minimum: int, allow_none: bool) -> str:
    what = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
    return what + (" or None" if allow_none else "")


def int_at_least(name: str, value, minimum: int, *, allow_none: bool = False) -> int | None:
    """``value`` as an ``int >= minimum`` (or None when ``allow_none``), else an error naming
    ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be {_wanted(minimum, allow_none)}, got "
                                f"{value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {_wanted(minimum, allow_none)}, got {value!r}")
    return int(value)


def positive_int(name: str, value, *, allow_none: bool = False) -> int | None:
    """``value`` as an ``int >= 1`` (or None when ``allow_none``)."""
    return int_at_least(name, value, 1, allow_none=allow_none)


# Below this a softmax temperature turns fp32 logits into inf (use greedy decoding instead).
MIN_TEMPERATURE = 1e-6


def temperature(value, name: str = "temperature") -> float:
    """A finite softmax temperature >= ``MIN_TEMPERATURE``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= MIN_TEMPERATURE):
        raise ValueError(f"{name} must be a finite number >= {MIN_TEMPERATURE:g} (smaller "
                         f"values overflow the scaled logits), got {value}")
    return float(value)


def streamer_hooks(streamer):
    """``(emit, finish)`` of a generation streamer: a callable ``streamer(tokens)``, or an
    object with ``put(tokens)`` (and optionally ``end()``) like Hugging Face's streamers."""
    if streamer is None:
        return None, None
    if hasattr(streamer, "put"):
        return streamer.put, getattr(streamer, "end", None)
    if callable(streamer):
        return streamer, None
    raise TypeError("streamer must be callable or have a put(tokens) method, "
                    f"got {type(streamer).__name__}")


def token_id(name: str, value, vocab_size: int) -> int:
    """``value`` as a token id in ``[0, vocab_size)`` (an int, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int token id, got {type(value).__name__}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got {value}")
    return int(value)
