"""Local data files read lazily, without Hugging Face ``datasets``.

JSON Lines and text files are indexed once (the byte offset of each line: 8 bytes
per record in memory) and each record is read and parsed when it is asked for, so
a large file costs neither minutes of parsing nor gigabytes of Python objects per
process. A ``.json`` file may hold JSON lines or one JSON array (read whole); a
``.csv`` file is read whole (quoted fields may span lines).

Every record source offers ``len``, indexing, iteration and ``byte_length(i)`` (the
size of the record's text: a cheap proxy for its token count, for length bucketing).
"""

from __future__ import annotations

import bisect
import csv
import json
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["JsonLinesFile", "TextLinesFile", "InMemoryRecords", "ConcatRecords", "open_records"]


class _LineIndex:
    """Byte offsets of the non-blank lines of a file."""

    def __init__(self, path: str):
        self.path = path
        starts, lengths = [], []
        with open(path, "rb") as fh:
            offset = 0
            for line in fh:
                if line.strip():
                    starts.append(offset)
                    lengths.append(len(line))
                offset += len(line)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, i: int) -> str:
        if self._fh is None or self._pid != os.getpid():  # reopen after a fork
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        self._fh.seek(int(self.starts[i]))
        raw = self._fh.read(int(self.lengths[i]))
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.path}: record {i} is not UTF-8 text ({exc.reason})") from None

    def __getstate__(self):  # picklable (e.g. DataLoader workers): no open file
        state = dict(self.__dict__)
        state["_fh"] = None
        return state


class _Records(Sequence):
    def byte_length(self, i: int) -> int:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"record index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range ({n} records)")
        return self._get(int(i) % n)


class JsonLinesFile(_Records):
    """One JSON object per line."""

    def __init__(self, path: str):
        self.path = path
        self.index = _LineIndex(path)

    def __len__(self):
        return len(self.index)

    def _get(self, i):
        line = self.index.line(i)
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{self.path}: record {i + 1} is not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.path}: record {i + 1} must be a JSON object, got "
                             f"{type(record).__name__}")
        return record

    def byte_length(self, i):
        return int(self.index.lengths[i])


class TextLinesFile(_Records):
    """One record ``{"text": line}`` per non-blank line."""

    def __init__(self, path: str):
        self.path = path
        self.index = _LineIndex(path)

    def __len__(self):
        return len(self.index)

    def _get(self, i):
        return {"text": self.index.line(i)}

    def byte_length(self, i):
        return int(self.index.lengths[i])


class InMemoryRecords(_Records):
    def __init__(self, records: list[dict], source: str = "records"):
        self.records = records
        self.source = source
        self._sizes = None

    def __len__(self):
        return len(self.records)

    def _get(self, i):
        return self.records[i]

    def byte_length(self, i):
        if self._sizes is None:
            self._sizes = [sum(len(str(v).encode()) for v in r.values()) for r in self.records]
        return self._sizes[i]


class ConcatRecords(_Records):
    def __init__(self, parts: list[_Records]):
        self.parts = parts
        self.ends = list(np.cumsum([len(p) for p in parts]))

    def __len__(self):
        return int(self.ends[-1]) if self.ends else 0

    def _locate(self, i):
        k = bisect.bisect_right(self.ends, i)
        return self.parts[k], i - (int(self.ends[k - 1]) if k else 0)

    def _get(self, i):
        part, j = self._locate(i)
        return part[j]

    def byte_length(self, i):
        part, j = self._locate(i)
        return part.byte_length(j)


def _read_json(path: str) -> _Records:
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith("["):
        return JsonLinesFile(path)
    with open(path, encoding="utf-8") as fh:
        try:
            rows = json.load(fh)
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: a JSON array of records must hold objects")
    return InMemoryRecords(rows, path)


def _read_csv(path: str) -> _Records:
    with open(path, encoding="utf-8", newline="") as fh:
        return InMemoryRecords(list(csv.DictReader(fh)), path)


READERS = {".jsonl": JsonLinesFile, ".json": _read_json, ".txt": TextLinesFile,
           ".text": TextLinesFile, ".csv": _read_csv}


def open_records(files: Sequence[str]) -> _Records:
    """Records of local files (all of one format, see :data:`READERS`)."""
    parts = []
    for path in files:
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in READERS:
            raise ValueError(f"cannot read {path!r} without the 'datasets' package: "
                             f"expected one of {sorted(READERS)}")
        parts.append(READERS[suffix](path))
    return parts[0] if len(parts) == 1 else ConcatRecords(parts)
