"""Load raw records from local json / jsonl / csv / text / parquet files or a hub dataset.

Local JSON Lines, JSON, CSV and text files are read by :mod:`.files` (lazily, no
extra package). Parquet files and hub dataset names go through Hugging Face
``datasets`` (an optional extra, imported only then). A name that is not a local
path is looked up on the hub when online, or in the local ``datasets`` cache; when
neither works the error says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .files import READERS, open_records

__all__ = ["load_records", "DatasetUnavailableError", "LOCAL_FORMATS"]

# file suffix -> the ``datasets`` builder that reads it
LOCAL_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}


class DatasetUnavailableError(RuntimeError):
    """A dataset name could not be loaded (offline and not cached, or unknown)."""


def _datasets():
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("parquet files and hub datasets need the 'datasets' package: "
                          "pip install 'fastencdec[data]' (or read JSONL/CSV/text files)"
                          ) from exc
    return datasets


def _builder_for(paths: Sequence[str]) -> str:
    kinds = set()
    for p in paths:
        suffix = os.path.splitext(p)[1].lower()
        if suffix not in LOCAL_FORMATS:
            raise ValueError(f"cannot tell the format of {p!r}: expected one of "
                             f"{sorted(LOCAL_FORMATS)}")
        kinds.add(LOCAL_FORMATS[suffix])
    if len(kinds) > 1:
        raise ValueError(f"data files mix formats {sorted(kinds)}; pass one format at a time")
    return kinds.pop()


def load_records(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str = "train",
    name: str | None = None,
    cache_dir: str | None = None,
    streaming: bool = False,
):
    """Records (dict per row): indexable, ``len``-able, iterable.

    ``source``: a local file, a list of local files of one format, a directory of
    such files, or a hub dataset name (``name`` = its configuration). Text files
    give one record ``{"text": line}`` per non-blank line. Local JSON/JSONL/CSV/text
    files are read without ``datasets`` (``split``, ``cache_dir`` and ``streaming``
    apply to parquet files and hub datasets only).
    """
    if isinstance(source, (str, os.PathLike)):
        source_list = [os.fspath(source)]
    elif isinstance(source, Sequence) and source:
        source_list = [os.fspath(s) for s in source]
    else:
        raise TypeError("source must be a path, a list of paths or a dataset name, "
                        f"got {source!r}")
    local = [p for p in source_list if os.path.exists(p)]
    if local and len(local) != len(source_list):
        missing = sorted(set(source_list) - set(local))
        raise FileNotFoundError(f"data files not found: {missing}")
    if local:
        files = []
        for p in local:
            if os.path.isdir(p):
                files += sorted(os.path.join(p, f) for f in os.listdir(p)
                                if os.path.splitext(f)[1].lower() in LOCAL_FORMATS)
            else:
                files.append(p)
        if not files:
            raise FileNotFoundError(f"no data files ({sorted(LOCAL_FORMATS)}) in {local}")
        builder = _builder_for(files)
        for f in files:
            if os.path.isfile(f) and os.path.getsize(f) == 0:
                raise ValueError(f"data file {f} is empty")
        if all(os.path.splitext(f)[1].lower() in READERS for f in files):
            return open_records(files)
        datasets = _datasets()
        return datasets.load_dataset(builder, data_files={split: files}, split=split,
                                     cache_dir=cache_dir, streaming=streaming)

    if len(source_list) != 1:
        raise FileNotFoundError(f"data files not found: {source_list}")
    hub_name = source_list[0]
    looks_like_file = os.path.splitext(hub_name)[1].lower() in LOCAL_FORMATS
    if (looks_like_file or hub_name.startswith((".", "/", "~"))
            or os.sep in hub_name.strip("/").replace("/", "", 1)):
        raise FileNotFoundError(f"data file or directory not found: {hub_name}")
    datasets = _datasets()
    try:
        return datasets.load_dataset(hub_name, name, split=split, cache_dir=cache_dir,
                                     streaming=streaming)
    except (ValueError, TypeError, KeyError):
        raise
    except Exception as exc:  # network errors, DatasetNotFoundError, offline mode, ...
        raise DatasetUnavailableError(
            f"could not load dataset {hub_name!r} (split {split!r}): it is not a local path, "
            "and the hub could not provide it — offline and not in the datasets cache, or no "
            f"such dataset. Cause: {type(exc).__name__}: {exc}"
        ) from exc
