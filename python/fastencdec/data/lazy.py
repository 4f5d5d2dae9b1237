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
    """Raw text lines (documents, joined by ``separator``) cut into chunks of ``length``
    tokens; chunk ``i`` is tokenised when asked for and returned as
    ``{"input_ids": [...]}``.

    Where each chunk starts is planned from byte sizes (``bytes_per_token`` measured
    on the first lines): chunk ``i`` starts at the estimated token ``i * length`` of
    the whole text, then takes ``length`` consecutive tokens from there. Estimates
    are not exact, so neighbouring chunks may overlap or skip a few tokens; every
    chunk is consecutive text, and the text is covered about once.
    """

    def __init__(self, records: Sequence, tokenizer, length: int, *, field: str = "text",
                 separator: int | None = None, sample_lines: int = 200):
        if length < 2:
            raise ValueError(f"length must be >= 2, got {length}")
        if len(records) == 0:
            raise ValueError("no text to make pretraining blocks from")
        self.records, self.tok, self.length = records, tokenizer, length
        self.field, self.separator = field, separator
        sizes = np.asarray(approx_lengths(records), dtype=np.float64)
        sample = range(min(sample_lines, len(records)))
        sample_tokens = sum(len(self._tokens(i)) for i in sample)
        self.bytes_per_token = float(sizes[:len(sample)].sum()) / max(sample_tokens, 1)
        self.estimates = np.maximum(sizes / max(self.bytes_per_token, 1e-9), 1.0)
        self.ends = np.cumsum(self.estimates)  # estimated token offset where each line ends
        self.n_chunks = max(int(self.ends[-1] // length), 1)

    def _tokens(self, i: int) -> list[int]:
        record = self.records[i]
        if self.field not in record:
            raise KeyError(f"a text record has no field {self.field!r} (fields: {sorted(record)})")
        ids = self.tok.encode(str(record[self.field]))
        return ids if self.separator is None else ids + [self.separator]

    def __len__(self) -> int:
        return self.n_chunks

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        start = i * self.length
        line = int(np.searchsorted(self.ends, start, side="right"))
        line = min(line, len(self.ends) - 1)
        ids = self._tokens(line)
        before = float(self.ends[line - 1]) if line else 0.0
        skip = int(round((start - before) / self.estimates[line] * len(ids)))
        ids = ids[min(max(skip, 0), max(len(ids) - 1, 0)):]
        line += 1
        while len(ids) < self.length and line < len(self.ends):
            ids += self._tokens(line)
            line += 1
        return {"input_ids": ids[: self.length]}

    def lengths(self) -> list[int]:
        """Tokens per chunk as planned (for bucketing, without tokenising)."""
        return [self.length] * len(self)
