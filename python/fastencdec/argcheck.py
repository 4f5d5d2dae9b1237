"""The one check for integer arguments (counts, sizes, limits), shared by every module.

A bool is not an int here (``True`` as a batch size is a bug), numpy integers are
accepted and returned as ``int``, and the error names the argument and the range.
"""

from __future__ import annotations

import numbers

__all__ = ["ArgumentTypeError", "int_at_least", "positive_int"]


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
