"""Pure-PyTorch reference implementations of every fastencdec op (DESIGN §3).

Written for clarity, float64-capable, no fused tricks: the ground truth that
every Triton and C++ kernel is tested against.
"""

from .attention import append_kv_cache, cross_attention, decode_attention, self_attention
from .distill import distill_loss, distill_loss_from_logits, distill_loss_from_teacher_hidden
from .rope import apply_rope, rope_base

__all__ = [
    "self_attention",
    "cross_attention",
    "decode_attention",
    "append_kv_cache",
    "apply_rope",
    "rope_base",
    "distill_loss",
    "distill_loss_from_logits",
    "distill_loss_from_teacher_hidden",
]
