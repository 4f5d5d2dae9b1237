"""Input checks shared by every op (DESIGN §2), run before any kernel launches.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, value or device) naming the argument and what was expected.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


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
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")
    return t


def same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on one device"
            )


def same_dtype(**tensors) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def dim_equals(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} has {what} = {t.shape[dim]} (shape {_shape(t)}), expected {expected}"
        )


def nonempty(name: str, t: torch.Tensor, dims, what: str) -> None:
    for d in dims:
        if t.shape[d] == 0:
            raise ValueError(f"{name} has an empty {what} (shape {_shape(t)}); sizes must be >= 1")


def qkv(q, k, v, *, q_name="q", k_name="k", v_name="v", same_len: bool) -> tuple[int, int, int]:
    """Check ``q [B, Lq, Hq, D]``, ``k``/``v`` ``[B, Lk, Hkv, D]``; return (Hq, Hkv, D)."""
    layout_q = "[batch, seq, n_heads, head_dim]"
    layout_kv = "[batch, seq, n_kv_heads, head_dim]"
    tensor(q_name, q, ndim=4, layout=layout_q)
    tensor(k_name, k, ndim=4, layout=layout_kv)
    tensor(v_name, v, ndim=4, layout=layout_kv)
    same_device(**{q_name: q, k_name: k, v_name: v})
    same_dtype(**{q_name: q, k_name: k, v_name: v})
    nonempty(q_name, q, (0, 1, 2, 3), "dimension")
    nonempty(k_name, k, (1, 2), "dimension")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} {_shape(k)} and {v_name} {_shape(v)} must have the same shape")
    dim_equals(k_name, k, 0, q.shape[0], "batch")
    dim_equals(k_name, k, 3, q.shape[3], "head_dim")
    if same_len:
        dim_equals(k_name, k, 1, q.shape[1], "seq length (self-attention)")
    n_heads, n_kv = q.shape[2], k.shape[2]
    if n_heads % n_kv != 0:
        raise ValueError(
            f"{q_name} has {n_heads} heads and {k_name} has {n_kv}: n_heads must be a multiple "
            "of n_kv_heads (grouped-query attention)"
        )
    return n_heads, n_kv, q.shape[3]


def key_padding_mask(mask, batch: int, seq_len: int, device, name="key_padding_mask") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{name} must be a bool torch.Tensor [batch, seq], got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, seq_len):
        raise ValueError(f"{name} must have shape [{batch}, {seq_len}], got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, expected {device}")


def positions(pos, batch: int, seq_len: int, device, name="positions") -> None:
    if pos is None:
        return
    if isinstance(pos, bool):
        raise TypeError(f"{name} must be an int offset or an integer tensor [batch, seq], got bool")
    if isinstance(pos, int):
        if pos < 0:
            raise ValueError(f"{name} offset must be >= 0, got {pos}")
        return
    if not isinstance(pos, torch.Tensor):
        raise TypeError(
            f"{name} must be an int offset or an integer tensor [batch, seq], "
            f"got {type(pos).__name__}"
        )
    if pos.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {pos.dtype}")
    if pos.dim() == 0:
        return
    if tuple(pos.shape) != (batch, seq_len):
        raise ValueError(
            f"{name} must be a scalar or have shape [{batch}, {seq_len}], got {_shape(pos)}"
        )
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device}, expected {device}")


def rope_head_dim(name: str, head_dim: int) -> None:
    if head_dim % 2:
        raise ValueError(f"{name} head_dim must be even for RoPE (rotate-half), got {head_dim}")


def rope_scaling(scaling_factor: float, max_position_embeddings) -> None:
    if scaling_factor < 1.0:
        raise ValueError(f"rope_scaling_factor must be >= 1, got {scaling_factor}")
    if scaling_factor > 1.0 and max_position_embeddings is None:
        raise ValueError("rope_scaling_factor > 1 needs max_position_embeddings")


def scale(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")


def cache_seqlens(lens, batch: int, lmax: int, t_new: int, device, *, check_values: bool) -> None:
    tensor("cache_seqlens", lens, ndim=1, layout="[batch]", dtypes=INDEX_DTYPES)
    if lens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have shape [{batch}], got {_shape(lens)}")
    if lens.device != device:
        raise ValueError(f"cache_seqlens is on {lens.device}, expected {device}")
    # Reading values syncs with the device: skipped while a CUDA graph is captured.
    if check_values and lens.numel():
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 0 or hi > lmax:
            raise ValueError(
                f"cache_seqlens values must lie in [0, {lmax}] (cache length), got [{lo}, {hi}]"
            )


def can_read_values(t: torch.Tensor) -> bool:
    """False while a CUDA graph is being captured (reading would sync)."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())
