"""``Rope``: the one description of rotary position embedding that every op, kernel,
reference and model shares (DESIGN §1-2).

RoPE uses the rotate-half convention: element ``i`` of a head pairs with ``i + D/2``
and both turn by ``position * base ** (-2i / D)``. With dynamic NTK scaling
(``scaling_factor > 1``) the base grows once a sequence is longer than
``max_position_embeddings``::

    base = theta * ((f * L_eff / L_max) - (f - 1)) ** (D / (D - 2)),  L_eff = max(L, L_max)

``L`` is the sequence length the scaling is taken at: by default ``max(position) + 1``
of the call, or ``seq_len`` when it is fixed (generation fixes it to the current total
length, the encoder to its padded length: what the reference model does). This module
is the only place that formula lives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from .argcheck import int_at_least
from .rope_math import rope_base

__all__ = ["Rope", "rope_base", "rope_inv_freq", "as_rope"]


def _finite_number(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


@dataclass(frozen=True)
class Rope:
    """RoPE settings. ``theta``: base frequency (finite, > 0). ``scaling_factor`` >= 1:
    dynamic NTK scaling past ``max_position_embeddings`` (required when > 1).
    ``seq_len``: the length the NTK base is taken at (None: ``max(position) + 1``)."""

    theta: float = 10000.0
    scaling_factor: float = 1.0
    max_position_embeddings: int | None = None
    seq_len: int | None = None

    def __post_init__(self) -> None:
        if not _finite_number(self.theta) or self.theta <= 0:
            raise ValueError(f"rope theta (rope_theta) must be a finite number > 0, "
                             f"got {self.theta!r}")
        if not _finite_number(self.scaling_factor) or self.scaling_factor < 1.0:
            raise ValueError(f"rope scaling_factor (rope_scaling_factor) must be a finite "
                             f"number >= 1, got {self.scaling_factor!r}")
        # numpy ints become ints: the spec is hashed and flattened into op arguments
        object.__setattr__(self, "max_position_embeddings", int_at_least(
            "rope max_position_embeddings", self.max_position_embeddings, 1, allow_none=True))
        object.__setattr__(self, "seq_len",
                           int_at_least("rope seq_len", self.seq_len, 0, allow_none=True))
        if self.scaling_factor > 1.0 and self.max_position_embeddings is None:
            raise ValueError("rope_scaling_factor > 1 needs max_position_embeddings "
                             "(the trained context length)")

    @property
    def dynamic(self) -> bool:
        """True when the base depends on the sequence length (dynamic NTK scaling)."""
        return self.scaling_factor > 1.0

    def base(self, head_dim: int, seq_len: int = 0) -> float:
        """The effective base for ``head_dim`` at ``seq_len`` (``self.seq_len`` wins)."""
        if self.seq_len is not None:
            seq_len = self.seq_len
        return rope_base(self.theta, head_dim, seq_len, self.scaling_factor,
                         self.max_position_embeddings)

    def at_length(self, seq_len: int) -> Rope:
        """The same settings with the NTK length fixed to ``seq_len``."""
        if not self.dynamic or seq_len == self.seq_len:
            return self
        return replace(self, seq_len=int(seq_len))

    def needs_positions_max(self) -> bool:
        """Whether the base depends on ``max(position)`` of a call (a host read)."""
        return self.dynamic and self.seq_len is None


def rope_inv_freq(head_dim: int, base: float, device=None) -> torch.Tensor:
    """``base ** (-2i / d)`` for ``i`` in ``[0, d/2)``, float64."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return torch.pow(torch.tensor(float(base), dtype=torch.float64, device=device), -exponents)


@lru_cache(maxsize=64)
def _cached_rope(theta, scaling_factor, max_position_embeddings) -> Rope:
    return Rope(theta, scaling_factor, max_position_embeddings)


def as_rope(rope, theta=10000.0, scaling_factor=1.0, max_position_embeddings=None) -> Rope | None:
    """The ``Rope`` an op call asks for: ``rope`` may be a ``Rope`` (then the loose
    arguments must keep their defaults), ``True`` (built from the loose arguments) or
    ``False``/``None`` (no rotation)."""
    if isinstance(rope, Rope):
        if (theta, scaling_factor, max_position_embeddings) != (10000.0, 1.0, None):
            raise ValueError("pass either rope=Rope(...) or the loose rope_theta/"
                             "rope_scaling_factor/max_position_embeddings arguments, not both")
        return rope
    if rope is None or rope is False:
        return None
    if rope is not True:
        raise TypeError(f"rope must be a bool or a fastencdec.Rope, got {type(rope).__name__}")
    if torch.compiler.is_compiling():  # traced once; the cache would only be bypassed
        return Rope(theta, scaling_factor, max_position_embeddings)
    try:
        return _cached_rope(theta, scaling_factor, max_position_embeddings)
    except TypeError:  # unhashable arguments: let Rope's own checks name them
        return Rope(theta, scaling_factor, max_position_embeddings)
