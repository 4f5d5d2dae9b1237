"""fastencdec's functional ops (DESIGN §3).

Each op checks its inputs once (``validate``), resolves its defaults into the
canonical arguments of ``schema``, and runs the backend ``dispatch`` picks: CUDA
tensors -> Triton kernels, CPU tensors -> C++ kernels (inference) or the reference
(training); ``FASTENCDEC_BACKEND=reference|triton|cpp`` forces one. Every op is also
a ``torch.library`` custom op ``fastencdec::<name>`` (``library``), which autograd,
``torch.compile`` and ``torch.export`` use.
"""

from ..spec import Rope
from . import library  # noqa: F401  (registers the custom ops)
from .attention import append_kv_cache, cross_attention, decode_attention, self_attention
from .distill import distill_loss, distill_loss_from_logits, distill_loss_from_teacher_hidden
from .norm import rms_norm
from .rope import apply_rope

__all__ = [
    "Rope",
    "self_attention",
    "cross_attention",
    "decode_attention",
    "append_kv_cache",
    "apply_rope",
    "rms_norm",
    "distill_loss",
    "distill_loss_from_logits",
    "distill_loss_from_teacher_hidden",
]
