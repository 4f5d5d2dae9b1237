"""Replay the decode step as a CUDA graph (GPU only; CPU never gets here).

A decode step has static shapes: the token buffer, the caches, ``cache.lens`` and
the cross-attention K/V keep their addresses, so one capture serves every step.
The step must not read device values on the host; the ops skip their value
checks while a capture runs, but the reference implementations do read values,
so the automatic mode captures only when every op of the step runs a Triton
kernel, and falls back to eager execution (with a warning) if capture fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..ops import dispatch

STEP_OPS = ("append_kv_cache", "decode_attention", "cross_attention")


def should_capture(requested: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    if requested is None:
        return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)
                and all(dispatch.choose_backend(op, device) == "triton" for op in STEP_OPS))
    if requested and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {device}")
    return bool(requested)


class GraphedStep:
    """``step(tokens [R, T]) -> logits``, captured on the first call, replayed after.

    The first call warms up on a side stream (Triton compilation, allocator), which
    is harmless because a step is idempotent until the caller advances
    ``cache.lens``. The returned logits live in a static buffer overwritten by the
    next replay (the decode loop consumes them first).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, strict: bool):
        self.fn, self.strict = fn, strict
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False

    def _capture(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(self.tokens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.fn(self.tokens)
        self.graph = graph

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.fn(tokens)
        if self.graph is None:
            try:
                self._capture(tokens)
            except Exception as err:  # a sync inside the step, an unsupported op, ...
                if self.strict:
                    raise
                warnings.warn(f"CUDA graph capture of the decode step failed ({err}); "
                              "decoding eagerly", stacklevel=2)
                self.eager = True
                return self.fn(tokens)
        else:
            self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def maybe_graphed(fn, requested: bool | None, device: torch.device, dtype: torch.dtype):
    if not should_capture(requested, device, dtype):
        return fn
    return GraphedStep(fn, strict=bool(requested))
