"""The reference backend: ``fastencdec.reference`` behind the canonical signatures.

The training ops use the reference's written-out gradients (``attention_backward``,
``distill_grads_from_logits``), which the tests check against autograd through the
reference forward. (Autograd cannot run inside a custom op's implementation.)
"""

from __future__ import annotations

import torch

from ... import reference as ref
from .. import validate
from ..dispatch import Kernel


def _positions(positions, offset):
    return offset if positions is None else positions


def apply_rope(x, positions, offset, rope, inverse):
    return ref.rotate(x, _positions(positions, offset), rope, inverse=inverse)


def rms_norm(x, weight, eps):
    return ref.rms_norm(x, weight, eps).contiguous()


def self_attention(q, k, v, mask, positions, offset, causal, scale, rope, with_lse=False):
    return ref.self_attention(q, k, v, causal=causal, key_padding_mask=mask,
                              positions=_positions(positions, offset),
                              rope=False if rope is None else rope, scale=scale,
                              with_lse=with_lse)


def self_attention_with_lse(q, k, v, mask, positions, offset, causal, scale, rope,
                            deterministic):
    del deterministic  # the reference is deterministic anyway
    return self_attention(q, k, v, mask, positions, offset, causal, scale, rope, with_lse=True)


def cross_attention(q, k, v, mask, scale, with_lse=False):
    return ref.cross_attention(q, k, v, key_padding_mask=mask, scale=scale, with_lse=with_lse)


def cross_attention_with_lse(q, k, v, mask, scale, deterministic):
    del deterministic
    return cross_attention(q, k, v, mask, scale, with_lse=True)


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


def attention_backward(grad_out, q, k, v, out, lse, mask, positions, offset, causal, scale,
                       rope, need_dq, need_dkv, deterministic):
    """The written-out backward of the reference (recomputes the probabilities)."""
    del out, lse, deterministic  # the recomputation needs neither; it is deterministic
    dq, dk, dv = ref.attention_backward(grad_out, q, k, v, causal=causal, key_padding_mask=mask,
                                        positions=_positions(positions, offset), rope=rope,
                                        scale=scale)
    return (dq if need_dq else _empty(q), dk if need_dkv else _empty(k),
            dv if need_dkv else _empty(v))


def decode_attention(q, k_cache, v_cache, cache_seqlens, mask, scale):
    validate.cache_seqlens_values(cache_seqlens, k_cache.shape[1], 0)
    return ref.decode_attention(q, k_cache, v_cache, cache_seqlens, key_padding_mask=mask,
                                scale=scale)


def append_kv_cache(q, k, v, k_cache, v_cache, cache_seqlens, rope):
    validate.cache_seqlens_values(cache_seqlens, k_cache.shape[1], q.shape[1])
    return ref.append_kv_cache(q, k, v, k_cache, v_cache, cache_seqlens,
                               rope=False if rope is None else rope)


def _divergence(reverse: bool) -> str:
    return "reverse_kl" if reverse else "forward_kl"


def _head_loss(hidden, weight, teacher_logits, labels, alpha, temperature, reverse,
               ignore_index, want_grad_hidden, want_grad_weight):
    """Loss and gradients through a student LM head: ``logits = hidden @ weight.T``."""
    logits = hidden @ weight.t()
    loss, grad = ref.distill_grads_from_logits(
        logits, teacher_logits, labels, alpha=alpha, temperature=temperature,
        divergence=_divergence(reverse), ignore_index=ignore_index)
    return (loss,
            grad @ weight if want_grad_hidden else _empty(hidden),
            grad.t() @ hidden if want_grad_weight else _empty(weight))


def distill_loss(hidden, weight, teacher, labels, alpha, temperature, reverse, ignore_index,
                 chunk_size, want_grad_hidden, want_grad_weight):
    del chunk_size  # the reference computes every row at once
    return _head_loss(hidden, weight, teacher, labels, alpha, temperature, reverse,
                      ignore_index, want_grad_hidden, want_grad_weight)


def distill_loss_from_logits(logits, teacher, labels, alpha, temperature, reverse,
                             ignore_index, want_grad):
    loss, grad = ref.distill_grads_from_logits(
        logits, teacher, labels, alpha=alpha, temperature=temperature,
        divergence=_divergence(reverse), ignore_index=ignore_index)
    return loss, grad if want_grad else _empty(logits)


def distill_loss_from_teacher_hidden(hidden, weight, t_hidden, t_weight, labels, alpha,
                                     temperature, reverse, ignore_index, chunk_size,
                                     want_grad_hidden, want_grad_weight):
    del chunk_size
    return _head_loss(hidden, weight, t_hidden @ t_weight.t(), labels, alpha, temperature,
                      reverse, ignore_index, want_grad_hidden, want_grad_weight)


KERNELS = {name: Kernel(fn) for name, fn in {
    "apply_rope": apply_rope,
    "rms_norm": rms_norm,
    "self_attention": self_attention,
    "self_attention_with_lse": self_attention_with_lse,
    "cross_attention": cross_attention,
    "cross_attention_with_lse": cross_attention_with_lse,
    "attention_backward": attention_backward,
    "decode_attention": decode_attention,
    "append_kv_cache": append_kv_cache,
    "distill_loss": distill_loss,
    "distill_loss_from_logits": distill_loss_from_logits,
    "distill_loss_from_teacher_hidden": distill_loss_from_teacher_hidden,
}.items()}
