"""fastencdec's functional ops (DESIGN §3).

Each op validates its inputs, then ``dispatch`` picks the implementation:
CUDA tensors -> Triton kernels, CPU tensors -> C++ kernels (inference) or the
reference; ``FASTENCDEC_BACKEND=reference|triton|cpp`` forces one.
"""

from .attention import append_kv_cache, cross_attention, decode_attention, self_attention
from .distill import distill_loss, distill_loss_from_logits, distill_loss_from_teacher_hidden
from .rope import apply_rope

__all__ = [
    "self_attention",
    "cross_attention",
    "decode_attention",
    "append_kv_cache",
    "apply_rope",
    "distill_loss",
    "distill_loss_from_logits",
    "distill_loss_from_teacher_hidden",
]
