"""Examples made on demand: a record source mapped through a function, and raw text cut
into pretraining blocks, so that each process only tokenises the batches it takes.

``approx_lengths`` gives the byte size of each example's record: a cheap stand-in for
its token count, good enough for length bucketing, known without tokenising.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["MappedSequence", "TextBlocks", "approx_lengths"]


def approx_lengths(records: Sequence) -> list[int]:
    """Byte size per record (``byte_length`` when the source has it, else measured)."""
    if hasattr(records, "byte_length"):
        return [records.byte_length(i) for i in range(len(records))]
    return [sum(len(str(v).encode()) for v in r.values()) for r in records]


class MappedSequence(Sequence):
    """``fn(records[i])`` computed when item ``i`` is asked for."""

    def __init__(self, records: Sequence, fn: Callable):
        self.records = records
        self.fn = fn

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.fn(self.records[i])


class TextBlocks(Sequence):
    """Raw text lines grouped into blocks of about ``length`` tokens; block ``i`` is
    tokenised when asked for (lines joined by ``separator``, cut to ``length``
    tokens) and returned as ``{"input_ids": [...]}``.

    Blocks are formed from byte sizes with ``bytes_per_token`` measured on the first
    lines, aiming a little past ``length`` so most blocks fill up; the tokens past
    ``length`` in a block are dropped (about 10%). A line longer than a block becomes
    one block of its first ``length`` tokens.
    """

    def __init__(self, records: Sequence, tokenizer, length: int, *, field: str = "text",
                 separator: int | None = None, sample_lines: int = 200, overfill: float = 1.1):
        if length < 2:
            raise ValueError(f"length must be >= 2, got {length}")
        if len(records) == 0:
            raise ValueError("no text to make pretraining blocks from")
        self.records, self.tok, self.length = records, tokenizer, length
        self.field, self.separator = field, separator
        sizes = np.asarray(approx_lengths(records), dtype=np.int64)
        sample = range(min(sample_lines, len(records)))
        sample_tokens = sum(len(self._tokens(i)) for i in sample)
        sample_bytes = int(sizes[:len(sample)].sum())
        self.bytes_per_token = sample_bytes / max(sample_tokens, 1)
        target = self.bytes_per_token * length * overfill
        starts, total = [0], 0.0
        for i, size in enumerate(sizes):
            total += size
            if total >= target and i + 1 < len(sizes):
                starts.append(i + 1)
                total = 0.0
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.append(self.starts[1:], len(sizes))

    def _tokens(self, i: int) -> list[int]:
        record = self.records[i]
        if self.field not in record:
            raise KeyError(f"a text record has no field {self.field!r} (fields: {sorted(record)})")
        return self.tok.encode(str(record[self.field]))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        ids: list[int] = []
        for line in range(int(self.starts[i]), int(self.ends[i])):
            ids += self._tokens(line)
            if self.separator is not None:
                ids.append(self.separator)
            if len(ids) >= self.length:
                break
        return {"input_ids": ids[: self.length]}

    def lengths(self) -> list[int]:
        """Approximate tokens per block (for bucketing, without tokenising)."""
        return [self.length] * len(self)
