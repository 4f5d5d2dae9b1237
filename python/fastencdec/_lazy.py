"""Package names that load on first use (PEP 562), so that importing one torch-free part
of fastencdec (``fastencdec.runtime``, the tokenizers, the configs) never imports torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable


def lazy_names(package: str, exports: dict[str, str],
               submodules: Iterable[str] | None = None) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the submodule
    defining it; ``submodules`` are the submodules reachable as attributes (None: any)."""
    namespace = sys.modules[package].__dict__
    known = None if submodules is None else frozenset(submodules)

    def is_submodule(name: str) -> bool:
        if known is not None:
            return name in known
        return (name.isidentifier() and not name.startswith("__")
                and importlib.util.find_spec(f"{package}.{name}") is not None)

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        elif is_submodule(name):
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports) | (known or set()))

    return __getattr__, __dir__
