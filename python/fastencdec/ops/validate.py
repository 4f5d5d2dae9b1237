"""Input checks for every op (DESIGN §2), run once before any backend: every backend
sees the same accepted inputs, so the same call is refused or accepted everywhere.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, value or device) naming the argument and what was expected. Checks
read shapes, dtypes, strides and devices only, never tensor *values* (that would
stall a GPU): value checks (cache lengths, labels) run where reading values is free —
in the C++ kernels, in the CPU adapters of the reference and Triton backends — and
on CUDA only with ``FASTENCDEC_CHECKS=1``; the GPU kernels clamp what they read.
"""

from __future__ import annotations

import math
import os

import torch

from ..argcheck import MIN_TEMPERATURE, temperature  # noqa: F401 (re-exported)
from ..spec import Rope

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
DEVICE_TYPES = ("cpu", "cuda")
CHECKS_ENV_VAR = "FASTENCDEC_CHECKS"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def tensor(name: str, t, *, ndim: int, layout: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {_shape(t)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if t.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")
    return t


def same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on one device")


def same_dtype(**tensors) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def dim_equals(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} has {what} = {t.shape[dim]} (shape {_shape(t)}), "
                         f"expected {expected}")


def nonempty(name: str, t: torch.Tensor, dims, what: str) -> None:
    for d in dims:
        if t.shape[d] == 0:
            raise ValueError(f"{name} has an empty {what} (shape {_shape(t)}); sizes must be >= 1")


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def qkv(q, k, v, *, k_name="k", v_name="v", same_len: bool) -> int:
    """Check ``q [B, Lq, Hq, D]``, ``k``/``v`` ``[B, Lk, Hkv, D]``; returns ``D``.

    The common valid case is decided by one expression (the decode hot path calls
    this every layer); anything else goes through the detailed checks for the error."""
    try:
        qs, ks = q.shape, k.shape
        fast = (len(qs) == 4 and len(ks) == 4 and v.shape == ks and q.dtype in _KERNEL_DTYPES
                and k.dtype is q.dtype and v.dtype is q.dtype and qs[0] == ks[0]
                and qs[3] == ks[3] and ks[2] > 0 and qs[2] % ks[2] == 0
                and (qs[1] == ks[1] if same_len else ks[1] > 0) and q.numel() != 0)
        if fast and (q.is_cpu or q.is_cuda):  # DEVICE_TYPES (device.type builds a str)
            device = q.device
            if k.device == device and v.device == device:
                return qs[3]
    except (AttributeError, TypeError):
        pass
    return _qkv_detailed(q, k, v, k_name=k_name, v_name=v_name, same_len=same_len)


def _qkv_detailed(q, k, v, *, k_name, v_name, same_len: bool) -> int:
    tensor("q", q, ndim=4, layout="[batch, seq, n_heads, head_dim]")
    tensor(k_name, k, ndim=4, layout="[batch, seq, n_kv_heads, head_dim]")
    tensor(v_name, v, ndim=4, layout="[batch, seq, n_kv_heads, head_dim]")
    same_device(q=q, **{k_name: k, v_name: v})
    same_dtype(q=q, **{k_name: k, v_name: v})
    nonempty("q", q, (0, 1, 2, 3), "dimension")
    nonempty(k_name, k, (1, 2), "dimension")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} {_shape(k)} and {v_name} {_shape(v)} must have the same shape")
    dim_equals(k_name, k, 0, q.shape[0], "batch")
    dim_equals(k_name, k, 3, q.shape[3], "head_dim")
    if same_len:
        dim_equals(k_name, k, 1, q.shape[1], "seq length (self-attention)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q has {q.shape[2]} heads and {k_name} has {k.shape[2]}: n_heads must be a "
            "multiple of n_kv_heads (grouped-query attention)")
    return q.shape[3]


def key_padding_mask(mask, batch: int, seq_len: int, device, name="key_padding_mask") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor [batch, seq], "
                        f"got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, seq_len):
        raise ValueError(f"{name} must have shape [{batch}, {seq_len}], got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, expected {device}")


def positions(pos, batch: int, seq_len: int, device, name="positions"):
    """``None``, an int offset >= 0, a 0-d integer tensor (read as an offset) or an
    integer tensor ``[batch, seq]``. Returns ``(tensor or None, offset)``."""
    if pos is None:
        return None, 0
    if isinstance(pos, bool):
        raise TypeError(f"{name} must be an int offset or an integer tensor [batch, seq], got bool")
    if isinstance(pos, int):
        if pos < 0:
            raise ValueError(f"{name} offset must be >= 0, got {pos}")
        return None, pos
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be an int offset or an integer tensor [batch, seq], "
                        f"got {type(pos).__name__}")
    if pos.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {pos.dtype}")
    if pos.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {pos.device}")
    if pos.dim() == 0:
        return positions(int(pos), batch, seq_len, device, name)
    if tuple(pos.shape) != (batch, seq_len):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}, {seq_len}], "
                         f"got {_shape(pos)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device}, expected {device}")
    return pos, 0


def rope(spec: Rope | None, head_dim: int, name: str = "q") -> None:
    if spec is None:
        return
    if head_dim % 2:
        raise ValueError(f"{name} head_dim must be even for RoPE (rotate-half), got {head_dim}")
    if spec.dynamic and head_dim <= 2:
        raise ValueError(f"dynamic NTK RoPE scaling needs head_dim > 2, got {head_dim}")


def scale(value, head_dim: int) -> float:
    """The softmax scale: ``1/sqrt(head_dim)`` for None, else a finite real number."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return float(value)


def cache_seqlens(lens, batch: int, device) -> None:
    """Shape, dtype and device of ``cache_seqlens`` ``[batch]`` (values: see module doc)."""
    try:
        if lens.shape == (batch,) and lens.dtype in INDEX_DTYPES and lens.device == device:
            return
    except AttributeError:
        pass
    tensor("cache_seqlens", lens, ndim=1, layout="[batch]", dtypes=INDEX_DTYPES)
    if lens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have shape [{batch}], got {_shape(lens)}")
    if lens.device != device:
        raise ValueError(f"cache_seqlens is on {lens.device}, expected {device}")


def cache(name: str, c, batch: int, n_kv: int, head_dim: int, dtype, device, *,
          written: bool) -> int:
    """A KV cache ``[batch, max_len, n_kv_heads, head_dim]``; returns ``max_len``.
    A cache written in place must not alias itself (e.g. an ``expand``-ed tensor)."""
    try:  # the decode hot path: one expression for the common valid case
        s = c.shape
        if (len(s) == 4 and s[0] == batch and s[2] == n_kv and s[3] == head_dim and s[1] > 0
                and c.dtype == dtype and c.device == device
                and (not written or c.is_contiguous())):
            return s[1]
    except AttributeError:
        pass
    if not isinstance(c, torch.Tensor) or c.dim() != 4:
        tensor(name, c, ndim=4, layout="[batch, max_len, n_kv_heads, head_dim]")
    if c.shape[0] != batch or c.shape[2] != n_kv or c.shape[3] != head_dim:
        raise ValueError(f"{name} must have shape [{batch}, max_len, {n_kv}, {head_dim}], "
                         f"got {_shape(c)}")
    if c.dtype != dtype:
        raise TypeError(f"{name} has dtype {c.dtype} but q has {dtype}")
    if c.device != device:
        raise ValueError(f"{name} is on {c.device} but q is on {device}")
    if c.shape[1] == 0:
        raise ValueError(f"{name} has max_len 0 (shape {_shape(c)}); caches need >= 1 row")
    if written and not c.is_contiguous() and torch._debug_has_internal_overlap(c) == 1:
        raise ValueError(f"{name} has overlapping memory (strides {tuple(c.stride())}, e.g. "
                         "an expand()-ed tensor): it cannot be written in place; pass a "
                         "tensor that owns its rows (e.g. .contiguous())")
    return c.shape[1]


def values_checked(t: torch.Tensor) -> bool:
    """Whether value checks run for ``t``: always on the CPU (free), on CUDA only with
    ``FASTENCDEC_CHECKS=1`` (they would stall the device), never while a CUDA graph
    is being captured or a graph is being compiled (the kernels clamp what they read)."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    if os.environ.get(CHECKS_ENV_VAR, "") not in ("1", "true", "yes"):
        return False
    return not torch.cuda.is_current_stream_capturing()


def cache_seqlens_values(lens: torch.Tensor, max_len: int, t_new: int) -> None:
    """``0 <= cache_seqlens`` and ``cache_seqlens + t_new <= max_len`` (t_new = the new
    tokens an append writes; 0 for a read)."""
    if not lens.numel() or not values_checked(lens):
        return
    lo, hi = (int(x) for x in lens.aminmax())
    if lo < 0 or hi + t_new > max_len:
        if t_new:
            raise ValueError(f"cache_seqlens + {t_new} new tokens exceeds the cache length "
                             f"{max_len}: cache_seqlens holds [{lo}, {hi}], each must lie in "
                             f"[0, {max_len - t_new}]")
        raise ValueError(f"cache_seqlens values must lie in [0, {max_len}] (the cache "
                         f"length), got [{lo}, {hi}]")


def labels_values(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is ``ignore_index`` or lies in ``[0, vocab)``."""
    if not labels.numel() or not values_checked(labels):
        return
    real = labels[labels != ignore_index]
    if real.numel():
        lo, hi = (int(x) for x in real.aminmax())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                             f"{ignore_index}, got values in [{lo}, {hi}]")


# (MIN_TEMPERATURE and temperature() live in argcheck: the torch-free runtime checks them too)
