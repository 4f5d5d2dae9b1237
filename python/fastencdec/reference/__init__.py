"""Pure-PyTorch reference implementations of every fastencdec op (DESIGN §3).

Written for clarity, float64-capable, no fused tricks: the ground truth that
every Triton and C++ kernel is tested against. The backward passes are written
out too (``attention_backward``, ``distill_grads_from_logits``) and tested against
autograd through the forward.
"""

from .attention import (
    append_kv_cache,
    attention_backward,
    cross_attention,
    decode_attention,
    self_attention,
)
from .distill import (
    distill_grads_from_logits,
    distill_loss,
    distill_loss_from_logits,
    distill_loss_from_teacher_hidden,
)
from .norm import rms_norm
from .rope import apply_rope, rope_base, rotate

__all__ = [
    "self_attention",
    "cross_attention",
    "decode_attention",
    "append_kv_cache",
    "attention_backward",
    "apply_rope",
    "rms_norm",
    "rotate",
    "rope_base",
    "distill_loss",
    "distill_loss_from_logits",
    "distill_loss_from_teacher_hidden",
    "distill_grads_from_logits",
]
