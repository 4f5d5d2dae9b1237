"""Force every ``fastencdec.ops`` call onto one backend for a block of code.

Used to compare a model's kernel path with its reference path::

    with model.ops_backend("reference"):
        ref = model(ids).logits

It sets ``FASTENCDEC_BACKEND`` (ops read it on every call) and restores the old
value on exit; being an environment variable it is process-wide, not per thread.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ..ops.dispatch import BACKENDS, ENV_VAR


@contextmanager
def ops_backend(name: str | None):
    """``name``: ``"reference"``, ``"triton"``, ``"cpp"``, or None (automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    old = os.environ.get(ENV_VAR)
    if name is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old
