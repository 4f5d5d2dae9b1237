"""The CPU backend: the C++ kernels of ``fastencdec._C`` (inference) and the chunked
distillation loss (torch GEMMs + a vectorised row kernel, with gradients).

Tensors reach C++ as zero-copy numpy views (bf16/fp16 as ``uint16`` views of their
bits); outputs are allocated here and filled in place. Storage may be fp32, bf16 or
fp16 (compute is fp32). A non-contiguous q/k/v is made contiguous (one copy); caches
written in place must already be contiguous, and float64 inputs have no kernel:
those run the reference (``unsupported`` hooks). The C++ side checks again what
memory safety depends on, including cache lengths (a ``ValueError``, never a crash).
"""

from __future__ import annotations

import torch

from ..dispatch import Kernel
from . import distill_chunks
from .distill_rows_cpu import distill_rows

_STORAGE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


from fastencdec import _C as _cpp  # noqa: E402  (this backend is loaded only when usable)


def _C():
    return _cpp


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


def _np(t: torch.Tensor):
    """Zero-copy numpy view of a contiguous CPU tensor (bf16/fp16 as uint16 bits)."""
    return t.numpy() if t.dtype is torch.float32 else t.view(torch.uint16).numpy()


def _index(t: torch.Tensor):
    """int64 or int32 (the C++ side takes both) as a numpy view."""
    if t.dtype is not torch.int64 and t.dtype is not torch.int32:
        t = t.to(torch.int64)
    return _dense(t).numpy()


def _mask(mask):
    return None if mask is None else _dense(mask).numpy()


def _rope_base(rope, head_dim: int, max_position) -> float:
    """The effective base; ``max_position()`` (a value read) only when NTK needs it."""
    if rope.needs_positions_max():
        return rope.base(head_dim, int(max_position()) + 1)
    return rope.base(head_dim)


def _positions(positions, offset: int, seq_len: int) -> torch.Tensor:
    """Integer ``[1, L]`` for an offset (shared by the batch) or ``[B, L]``."""
    if positions is not None:
        return positions
    return torch.arange(offset, offset + seq_len, dtype=torch.int64).view(1, seq_len)


def apply_rope(x, positions, offset, rope, inverse):
    batch, seq_len, heads, head_dim = x.shape
    pos = _positions(positions, offset, seq_len).expand(batch, seq_len)
    base = _rope_base(rope, head_dim, pos.max)
    x32 = _dense(x.to(torch.float32))
    out = torch.empty_like(x32)
    _C().apply_rope(x32.view(batch * seq_len, heads, head_dim).numpy(),
                    _index(pos.reshape(batch * seq_len)), float(base),
                    out.view(batch * seq_len, heads, head_dim).numpy(), bool(inverse),
                    torch.get_num_threads())
    return out.to(x.dtype)


def rms_norm(x, weight, eps):
    x = _dense(x)
    out = torch.empty_like(x)
    if x.numel():
        rows = x.numel() // x.shape[-1]
        w = weight if weight.dtype is torch.float32 else weight.float()
        _cpp.rms_norm(_np(x.view(rows, x.shape[-1])), _dense(w).numpy(),
                      _np(out.view(rows, x.shape[-1])), eps, _STORAGE[x.dtype],
                      torch.get_num_threads())
    return out


def self_attention(q, k, v, mask, positions, offset, causal, scale, rope):
    """Fused RoPE (on q/k tiles as they are loaded) + GQA self-attention."""
    q, k, v = _dense(q), _dense(k), _dense(v)
    out = torch.empty_like(q)
    pos, base = None, 0.0
    if rope is not None:
        pos_t = _positions(positions, offset, q.shape[1])
        base = _rope_base(rope, q.shape[3], pos_t.max)
        pos = _index(pos_t)
    _C().self_attention(_np(q), _np(k), _np(v), _np(out), _mask(mask), pos, bool(causal),
                        scale, float(base), _STORAGE[q.dtype], torch.get_num_threads())
    return out


def cross_attention(q, k, v, mask, scale):
    # Once per decoder layer and token: the common case (dense fp32) written out inline.
    if (q.requires_grad or k.requires_grad or v.requires_grad
            or not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())):
        q, k, v = _dense(q), _dense(k), _dense(v)
    out = torch.empty_like(q)
    dtype = q.dtype
    if dtype is torch.float32:
        views = (q.numpy(), k.numpy(), v.numpy(), out.numpy())
    else:
        views = (_np(q), _np(k), _np(v), _np(out))
    _cpp.cross_attention(views[0], views[1], views[2], views[3],
                         None if mask is None else _mask(mask), scale, _STORAGE[dtype],
                         torch.get_num_threads())
    return out


def decode_attention(q, k_cache, v_cache, cache_seqlens, mask, scale):
    # Called once per layer and token: the common case (dense fp32, int32 lengths) is
    # written out inline; anything else takes the general helpers.
    if (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad
            or not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous())):
        q, k_cache, v_cache = _dense(q), _dense(k_cache), _dense(v_cache)
    out = torch.empty_like(q)
    dtype = q.dtype
    lens = (cache_seqlens.numpy() if cache_seqlens.dtype is torch.int32
            and cache_seqlens.is_contiguous() else _index(cache_seqlens))
    if dtype is torch.float32:
        views = (q.numpy(), k_cache.numpy(), v_cache.numpy(), out.numpy())
    else:
        views = (_np(q), _np(k_cache), _np(v_cache), _np(out))
    _cpp.decode_attention(views[0], views[1], views[2], lens,
                          None if mask is None else _mask(mask), views[3], scale,
                          _STORAGE[dtype], torch.get_num_threads())
    return out


def append_kv_cache(q, k, v, k_cache, v_cache, cache_seqlens, rope):
    t_new, head_dim = q.shape[1], q.shape[3]
    q, k, v = _dense(q), _dense(k), _dense(v)
    lens = _index(cache_seqlens)
    q_out = torch.empty_like(q)
    base = 0.0
    if rope is not None:
        base = _rope_base(rope, head_dim, lambda: lens.max() + (t_new - 1))
    if k_cache.requires_grad or v_cache.requires_grad:  # written in place, outside autograd
        k_cache, v_cache = k_cache.detach(), v_cache.detach()
    _C().append_kv_cache(_np(q), _np(k), _np(v), _np(k_cache), _np(v_cache), lens, _np(q_out),
                         rope is not None, float(base), _STORAGE[q.dtype],
                         torch.get_num_threads())
    if rope is None:
        q_out.copy_(q)
    return q_out


def distill_loss(hidden, weight, teacher, labels, alpha, temperature, reverse, ignore_index,
                 chunk_size, want_grad_hidden, want_grad_weight):
    shared = min(weight.shape[0], teacher.shape[1])
    return distill_chunks.fused_loss(
        distill_rows, hidden.detach(), weight.detach(),
        distill_chunks.teacher_logits_source(teacher.detach()), shared, 0, labels,
        alpha=alpha, temperature=temperature, reverse=reverse, ignore_index=ignore_index,
        chunk_size=chunk_size, want_grad_hidden=want_grad_hidden,
        want_grad_weight=want_grad_weight, budget=distill_chunks.CPU_CHUNK_BYTES)


def distill_loss_from_teacher_hidden(hidden, weight, t_hidden, t_weight, labels, alpha,
                                     temperature, reverse, ignore_index, chunk_size,
                                     want_grad_hidden, want_grad_weight):
    shared = min(weight.shape[0], t_weight.shape[0])
    source = distill_chunks.TeacherHeadSource(t_hidden.detach(), t_weight.detach(), shared)
    return distill_chunks.fused_loss(
        distill_rows, hidden.detach(), weight.detach(), source, shared,
        shared * t_hidden.element_size(), labels, alpha=alpha, temperature=temperature,
        reverse=reverse, ignore_index=ignore_index, chunk_size=chunk_size,
        want_grad_hidden=want_grad_hidden, want_grad_weight=want_grad_weight,
        budget=distill_chunks.CPU_CHUNK_BYTES)


def distill_loss_from_logits(logits, teacher, labels, alpha, temperature, reverse,
                             ignore_index, want_grad):
    return distill_chunks.from_logits(
        distill_rows, logits.detach(), teacher.detach(), labels, alpha=alpha,
        temperature=temperature, reverse=reverse, ignore_index=ignore_index,
        want_grad=want_grad)


def _unsupported_dtype(x, *args) -> str | None:
    if x.dtype not in _STORAGE:
        return f"{x.dtype} inputs have no C++ kernel"
    return None


def _unsupported_apply_rope(x, *args) -> str | None:
    return "float64 inputs have no C++ kernel" if x.dtype == torch.float64 else None


def _unsupported_append(q, k, v, k_cache, v_cache, *args) -> str | None:
    reason = _unsupported_dtype(q)
    if reason is None and not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        reason = "non-contiguous KV caches (written in place) have no C++ kernel"
    return reason


KERNELS = {
    "apply_rope": Kernel(apply_rope, _unsupported_apply_rope),
    "rms_norm": Kernel(rms_norm, _unsupported_dtype),
    "self_attention": Kernel(self_attention, _unsupported_dtype),
    "cross_attention": Kernel(cross_attention, _unsupported_dtype),
    "decode_attention": Kernel(decode_attention, _unsupported_dtype),
    "append_kv_cache": Kernel(append_kv_cache, _unsupported_append),
    "distill_loss": Kernel(distill_loss),
    "distill_loss_from_logits": Kernel(distill_loss_from_logits),
    "distill_loss_from_teacher_hidden": Kernel(distill_loss_from_teacher_hidden),
}
