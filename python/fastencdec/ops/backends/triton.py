"""The Triton backend: the kernels of ``fastencdec.kernels`` behind the canonical
signatures (CUDA, or the CPU under ``TRITON_INTERPRET=1``).

Supported: head_dim in ``SUPPORTED_HEAD_DIMS``, fp32/fp16/bf16 (fp32 dots in IEEE
precision, not TF32), any lengths, any strides with a unit stride on head_dim
(others are copied). The ``unsupported`` hooks send the rest to the reference:
other head dims, bf16 under the CPU interpreter (its ``tl.dot`` is unreliable for
bf16), batch or head counts above the CUDA grid limit.

Cross-attention with at most ``DECODE_MAX_QUERIES`` queries and no gradient runs
the split-K decode kernel (few queries, many keys).

The attention kernels take the max of each score row before scaling (one FMA per
score), which needs a positive scale: a scale <= 0 is folded into q here
(``q * sign``, exact) and the gradient of q turned back the same way.

``FASTENCDEC_DECODE_SPLITS=n`` forces the number of key splits of the decode kernel;
``FASTENCDEC_GROUP_SPLITS=n`` the number of programs the dK/dV kernel splits a GQA
group over; tests use them to cover every path.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch

from ...constants import SUPPORTED_HEAD_DIMS
from ...kernels import append_kv_cache as _append
from ...kernels import attention_bwd as _bwd
from ...kernels import attention_fwd as _fwd
from ...kernels import decode_attention as _decode
from ...kernels import distill_loss as _distill
from ...kernels import rms_norm as _rms_norm
from ...kernels import rope as _rope
from ...kernels.attention_setup import (
    MAX_GRID_YZ,
    interpreting,
    make_problem,
    rope_tables,
    table_dtype,
)
from ...spec import rope_inv_freq
from .. import validate
from ..dispatch import Kernel
from . import distill_chunks

DECODE_MAX_QUERIES = 16
SPLITS_ENV_VAR = "FASTENCDEC_DECODE_SPLITS"
GROUP_SPLITS_ENV_VAR = "FASTENCDEC_GROUP_SPLITS"  # force the dK/dV kernel's GQA group split
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_SM_COUNT = 8  # nominal, so the split heuristic still splits small CPU cases


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t = t.detach()
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- RoPE


def apply_rope(x, positions, offset, rope, inverse):
    x = _unit_last(x)
    batch, seq_len, _, head_dim = x.shape
    cos, sin, stride_b = rope_tables(positions, offset, batch, seq_len, head_dim, x.device,
                                     table_dtype(x.dtype), rope)
    return _rope.rotate(x, cos, sin, stride_b, inverse=inverse)


# --------------------------------------------------------------------------- attention


def _positive_scale(q, scale):
    """``(q', scale')`` with ``scale' > 0`` and ``q' . k * scale' == q . k * scale``."""
    if scale > 0:
        return q, scale
    if scale < 0:
        return q.neg(), -scale
    return torch.zeros_like(q), 1.0  # scale 0: every visible key weighs the same


def self_attention_with_lse(q, k, v, mask, positions, offset, causal, scale, rope,
                            deterministic):
    del deterministic  # the forward has no atomics
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    q, scale = _positive_scale(q, scale)
    problem = make_problem(q, mask, scale, causal=causal, positions=positions, offset=offset,
                           rope=rope)
    return _fwd.attention_fwd(q, k, v, problem)


def self_attention(q, k, v, mask, positions, offset, causal, scale, rope):
    return self_attention_with_lse(q, k, v, mask, positions, offset, causal, scale, rope,
                                   True)[0]


def cross_attention_with_lse(q, k, v, mask, scale, deterministic):
    del deterministic
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    q, scale = _positive_scale(q, scale)
    return _fwd.attention_fwd(q, k, v, make_problem(q, mask, scale, causal=False))


def cross_attention(q, k, v, mask, scale):
    if q.shape[1] <= DECODE_MAX_QUERIES:  # few queries, many keys: split-K decode kernel
        return _decode.decode_attention(q, k, v, key_mask=mask, scale=scale,
                                        num_splits=_splits(), sm_count=_sm_count(q.device))
    return cross_attention_with_lse(q, k, v, mask, scale, True)[0]


def attention_backward(grad_out, q, k, v, out, lse, mask, positions, offset, causal, scale,
                       rope, need_dq, need_dkv, deterministic):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    sign = 1.0 if scale > 0 else (-1.0 if scale < 0 else 0.0)
    q, scale = _positive_scale(q, scale)
    problem = make_problem(q, mask, scale, causal=causal, positions=positions, offset=offset,
                           rope=rope)
    dq, dk, dv = _bwd.attention_bwd(_unit_last(grad_out), q, k, v, out, lse, problem,
                                    need_dq=need_dq, need_dkv=need_dkv,
                                    deterministic=deterministic, sm_count=_sm_count(q.device),
                                    split_count=_env_int(GROUP_SPLITS_ENV_VAR))
    if dq is not None and sign != 1.0:
        dq.mul_(sign)  # d/dq of (sign * q): sign * dq'
    # unrequested gradients: distinct empty tensors (a custom op's outputs may not alias)
    return (q.new_empty(0) if dq is None else dq, k.new_empty(0) if dk is None else dk,
            v.new_empty(0) if dv is None else dv)


# --------------------------------------------------------------------------- decode


def decode_attention(q, k_cache, v_cache, cache_seqlens, mask, scale):
    validate.cache_seqlens_values(cache_seqlens, k_cache.shape[1], 0)
    return _decode.decode_attention(q, k_cache, v_cache, seqlens=cache_seqlens.contiguous(),
                                    key_mask=mask, scale=scale, num_splits=_splits(),
                                    sm_count=_sm_count(q.device))


def append_kv_cache(q, k, v, k_cache, v_cache, cache_seqlens, rope):
    validate.cache_seqlens_values(cache_seqlens, k_cache.shape[1], q.shape[1])
    turns = None
    if rope is not None:
        base = _append_rope_base(rope, cache_seqlens, q.shape[1], k_cache.shape[1], q.shape[3])
        turns = _turns_per_position(q.device, q.shape[3], base)
    return _append.append_kv_cache(q, k, v, k_cache, v_cache, cache_seqlens.contiguous(), turns)


def _append_rope_base(rope, cache_seqlens, t_new, cache_len, head_dim) -> float:
    """The reference's base: ``Rope.base`` at ``L = max(cache_seqlens) + T``. When the
    cache cannot outgrow ``max_position_embeddings``, ``L`` does not matter and no host
    read happens."""
    if not rope.needs_positions_max() or cache_len <= rope.max_position_embeddings:
        return rope.base(head_dim)
    if cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "append_kv_cache: dynamic NTK RoPE scaling with a cache longer than "
            "max_position_embeddings and no fixed Rope.seq_len reads max(cache_seqlens) on "
            "the host and cannot be captured in a CUDA graph")
    return rope.base(head_dim, int(cache_seqlens.max()) + t_new)


_TURNS_TABLES: dict[tuple, torch.Tensor] = {}


def _turns_per_position(device: torch.device, head_dim: int, base: float) -> torch.Tensor:
    """``inv_freq / 2pi`` (float64, the reference's inv_freq), cached per (device, D, base)."""
    key = (device, head_dim, base)
    table = _TURNS_TABLES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "append_kv_cache: the RoPE table for this (head_dim, base) is built on the "
                "first call; run one decode step before capturing a CUDA graph")
        if len(_TURNS_TABLES) >= 64:  # dynamic NTK changes the base every step: stay bounded
            _TURNS_TABLES.pop(next(iter(_TURNS_TABLES)))
        table = (rope_inv_freq(head_dim, base) / (2.0 * math.pi)).to(device)
        _TURNS_TABLES[key] = table
    return table


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def _splits():
    return _env_int(SPLITS_ENV_VAR)


@cache
def _sm_count_cached(device_type: str, index: int) -> int:
    if device_type != "cuda":
        return _INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else 0)
    return _sm_count_cached(device.type, index)


# --------------------------------------------------------------------------- distillation


def distill_loss(hidden, weight, teacher, labels, alpha, temperature, reverse, ignore_index,
                 chunk_size, want_grad_hidden, want_grad_weight):
    shared = min(weight.shape[0], teacher.shape[1])
    return distill_chunks.fused_loss(
        _distill.distill_rows, hidden.detach(), weight.detach(),
        distill_chunks.teacher_logits_source(teacher.detach()), shared, 0, labels,
        alpha=alpha, temperature=temperature, reverse=reverse, ignore_index=ignore_index,
        chunk_size=chunk_size, want_grad_hidden=want_grad_hidden,
        want_grad_weight=want_grad_weight)


def distill_loss_from_teacher_hidden(hidden, weight, t_hidden, t_weight, labels, alpha,
                                     temperature, reverse, ignore_index, chunk_size,
                                     want_grad_hidden, want_grad_weight):
    shared = min(weight.shape[0], t_weight.shape[0])
    source = distill_chunks.TeacherHeadSource(t_hidden.detach(), t_weight.detach(), shared)
    return distill_chunks.fused_loss(
        _distill.distill_rows, hidden.detach(), weight.detach(), source, shared,
        shared * t_hidden.element_size(), labels, alpha=alpha, temperature=temperature,
        reverse=reverse, ignore_index=ignore_index, chunk_size=chunk_size,
        want_grad_hidden=want_grad_hidden, want_grad_weight=want_grad_weight)


def distill_loss_from_logits(logits, teacher, labels, alpha, temperature, reverse,
                             ignore_index, want_grad):
    logits = logits.detach()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return distill_chunks.from_logits(
        _distill.distill_rows, logits, teacher.detach(), labels, alpha=alpha,
        temperature=temperature, reverse=reverse, ignore_index=ignore_index,
        want_grad=want_grad)


# --------------------------------------------------------------------------- hooks


def _unsupported_attention(q, *args) -> str | None:
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return (f"head_dim {head_dim} has no Triton attention kernel "
                f"(supported: {SUPPORTED_HEAD_DIMS})")
    if q.dtype not in _DTYPES:
        return f"{q.dtype} has no Triton attention kernel"
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        return "bf16 tl.dot is unreliable under the Triton CPU interpreter"
    if q.shape[0] > MAX_GRID_YZ or q.shape[2] > MAX_GRID_YZ:
        return f"batch or heads above {MAX_GRID_YZ} (CUDA grid limit)"
    return None


def _unsupported_backward(grad_out, q, *args) -> str | None:
    return _unsupported_attention(q)


def _unsupported_rope(x, *args) -> str | None:
    if x.dtype not in _DTYPES:
        return f"{x.dtype} has no Triton RoPE kernel"
    if x.shape[0] > MAX_GRID_YZ:
        return f"batch above {MAX_GRID_YZ} (CUDA grid limit)"
    return None


def _unsupported_append(q, *args) -> str | None:
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} has no Triton append_kv_cache kernel"
    if q.dtype not in _DTYPES:
        return f"{q.dtype} has no Triton append_kv_cache kernel"
    return None


def _unsupported_distill(hidden, *args) -> str | None:
    if hidden.dtype not in _DTYPES:
        return f"{hidden.dtype} inputs have no Triton distillation kernel"
    return None


def rms_norm(x, weight, eps):
    return _rms_norm.rms_norm(x, weight, eps)


def _unsupported_norm(x, *args) -> str | None:
    if x.dtype not in _DTYPES:
        return f"{x.dtype} has no Triton RMSNorm kernel"
    if x.shape[-1] > 65536:
        return "rows longer than 65536 have no Triton RMSNorm kernel"
    return None


KERNELS = {
    "rms_norm": Kernel(rms_norm, _unsupported_norm),
    "apply_rope": Kernel(apply_rope, _unsupported_rope),
    "self_attention": Kernel(self_attention, _unsupported_attention),
    "self_attention_with_lse": Kernel(self_attention_with_lse, _unsupported_attention),
    "cross_attention": Kernel(cross_attention, _unsupported_attention),
    "cross_attention_with_lse": Kernel(cross_attention_with_lse, _unsupported_attention),
    "attention_backward": Kernel(attention_backward, _unsupported_backward),
    "decode_attention": Kernel(decode_attention, _unsupported_attention),
    "append_kv_cache": Kernel(append_kv_cache, _unsupported_append),
    "distill_loss": Kernel(distill_loss, _unsupported_distill),
    "distill_loss_from_logits": Kernel(distill_loss_from_logits, _unsupported_distill),
    "distill_loss_from_teacher_hidden": Kernel(distill_loss_from_teacher_hidden,
                                               _unsupported_distill),
}
# interpreting() is re-exported for tests that need to know which tiles run
__all__ = ["KERNELS", "interpreting", "DECODE_MAX_QUERIES", "SPLITS_ENV_VAR"]
