"""Reading a safetensors file into numpy without torch and without mapping it.

The safetensors package maps the whole file; every page a load touches then counts in
the process's resident memory until the mapping closes, so a load would peak at twice
the weights. Here each tensor is read with ``readinto`` into the array that keeps it
(or into a temporary the caller drops once packed): the peak is the weights plus one
tensor. The format is an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` and the data; every
entry is checked against the file before anything is read.
"""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import numpy as np

# safetensors dtype -> the numpy dtype holding it (bf16 as its uint16 bits)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
          "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32,
          "I64": np.int64, "BOOL": np.bool_}
MAX_HEADER_BYTES = 100 << 20


class Entry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


class SafetensorsFile:
    """``with SafetensorsFile(path) as f``: ``f.metadata``, ``f.entries`` ({name: Entry}),
    ``f.read(name)`` -> a new numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            self.metadata, self.entries = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _bad(self, why: str) -> ValueError:
        return ValueError(f"{self.path}: not a readable safetensors file ({why})")

    def _parse_header(self):
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) != 8:
            raise self._bad("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise self._bad(f"header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(self._file.read(n))
        except (ValueError, RecursionError) as err:
            raise self._bad(f"header is not JSON: {err}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(v, str) for v in metadata.values()):
            raise self._bad("__metadata__ must map strings to strings")
        entries, data_start = {}, 8 + n
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise self._bad(f"malformed entry {name!r}") from None
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise self._bad(f"{name!r} has dtype {dtype!r}, not one of {sorted(DTYPES)}")
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                    isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise self._bad(f"{name!r} has a bad shape or data offsets")
            nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
            if end - begin != nbytes or data_start + end > size:
                raise self._bad(f"{name!r}: offsets {begin}..{end} do not hold {dtype} "
                                f"{list(shape)} inside the file")
            entries[name] = Entry(dtype, shape, data_start + begin, data_start + end)
        return metadata, entries

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``name`` as a new array (or into ``out``, a C-contiguous array of its
        dtype and size, which is returned reshaped)."""
        e = self.entries[name]
        dtype = DTYPES[e.dtype]
        if out is None:
            out = np.empty(e.shape, dtype=dtype)
        elif out.dtype != dtype or out.size != math.prod(e.shape) or not out.flags.c_contiguous:
            raise ValueError(f"{name}: out must be a C-contiguous {np.dtype(dtype)} array of "
                             f"{math.prod(e.shape)} elements")
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._file.seek(e.begin)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                raise self._bad(f"{name!r} ends early")
            done += got
        return out.reshape(e.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
