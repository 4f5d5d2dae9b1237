"""The shared integer-argument check, and that the modules using it keep its contract."""

import numpy as np
import pytest

from fastencdec import Rope
from fastencdec.argcheck import ArgumentTypeError, int_at_least, positive_int


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1)])
def test_positive_int_accepts_ints_and_returns_int(value):
    out = positive_int("n", value)
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [True, False, 1.0, "2", None, [1]])
def test_wrong_types_name_the_argument(value):
    with pytest.raises(ArgumentTypeError, match=r"^count must be a positive int, got"):
        positive_int("count", value)


def test_type_error_is_also_a_value_error():
    # callers written against the older checks caught ValueError
    with pytest.raises(TypeError):
        positive_int("n", 2.5)
    with pytest.raises(ValueError):
        positive_int("n", 2.5)


@pytest.mark.parametrize("minimum, bad", [(1, 0), (1, -3), (0, -1), (5, 4)])
def test_below_minimum_is_a_value_error(minimum, bad):
    with pytest.raises(ValueError, match="must be") as info:
        int_at_least("limit", bad, minimum)
    assert not isinstance(info.value, TypeError)
    assert int_at_least("limit", minimum, minimum) == minimum


def test_none_only_when_allowed():
    assert positive_int("k", None, allow_none=True) is None
    with pytest.raises(ArgumentTypeError, match="k must be a positive int, got None"):
        positive_int("k", None)
    with pytest.raises(ValueError, match="k must be a non-negative int or None"):
        int_at_least("k", -1, 0, allow_none=True)


def test_rope_normalises_numpy_lengths():
    rope = Rope(scaling_factor=2.0, max_position_embeddings=np.int64(64), seq_len=np.int32(0))
    assert type(rope.max_position_embeddings) is int and type(rope.seq_len) is int
    assert hash(rope) == hash(Rope(scaling_factor=2.0, max_position_embeddings=64, seq_len=0))
    with pytest.raises(ValueError, match="rope max_position_embeddings"):
        Rope(max_position_embeddings=0)
    with pytest.raises(ValueError, match="rope seq_len"):
        Rope(seq_len=True)
