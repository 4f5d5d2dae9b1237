"""The one signature of every op: canonical arguments, in order, as every backend
(reference, C++, Triton) implements them and as the ``torch.library`` custom ops
``fastencdec::<name>`` take them.

The public functions in ``attention.py``, ``rope.py`` and ``distill.py`` accept
friendly arguments (defaults, an int or a tensor for positions, ``scale=None``),
check them once (``validate``) and call an op with these canonical arguments: every
default resolved, ``scale`` a float, RoPE a :class:`~fastencdec.spec.Rope` or None.
A ``Rope?`` argument travels through the custom-op schema as five scalars
(``rope_*``); ``flatten``/``unflatten`` convert. Adding an option to an op means
adding it here, to the reference, and to the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import Rope

__all__ = ["OpSchema", "SCHEMAS", "flatten", "unflatten"]

_ROPE_FIELDS = ("bool rope", "float rope_theta", "float rope_scaling_factor",
                "int rope_max_positions", "int rope_seq_len")


@dataclass(frozen=True)
class OpSchema:
    name: str
    args: tuple[tuple[str, str], ...]  # (name, type) with types as in torch's schema language
    returns: str
    mutates: tuple[str, ...] = ()
    doc: str = ""

    @property
    def rope_index(self) -> int | None:
        """Position of the ``Rope``/``Rope?`` argument, if any."""
        for i, (_, kind) in enumerate(self.args):
            if kind.startswith("Rope"):
                return i
        return None

    def torch_schema(self) -> str:
        """The argument list in torch's schema language (``Rope?`` flattened)."""
        parts = []
        alias = iter("abcdefgh")
        for name, kind in self.args:
            if kind.startswith("Rope"):
                parts.extend(_ROPE_FIELDS)
            elif name in self.mutates:
                parts.append(f"Tensor({next(alias)}!) {name}")
            else:
                parts.append(f"{kind} {name}")
        return f"({', '.join(parts)}) -> {self.returns}"


def _args(spec: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in spec.split(","):
        name, kind = (s.strip() for s in item.split(":"))
        out.append((name, kind))
    return tuple(out)


_ATTN_QKV = "q: Tensor, k: Tensor, v: Tensor"
_SELF = (_ATTN_QKV + ", key_padding_mask: Tensor?, positions: Tensor?, position_offset: int, "
         "causal: bool, scale: float, rope: Rope?")
_CROSS = _ATTN_QKV + ", key_padding_mask: Tensor?, scale: float"
# Training ops also say how the backward may accumulate dQ (False: atomics, faster,
# run-to-run differences in the last bits).
_DETERMINISTIC = ", deterministic: bool"
_DISTILL = ("alpha: float, temperature: float, reverse: bool, ignore_index: int")

SCHEMAS: dict[str, OpSchema] = {s.name: s for s in (
    OpSchema("apply_rope", _args("x: Tensor, positions: Tensor?, position_offset: int, "
                                 "rope: Rope, inverse: bool"), "Tensor",
             doc="rotate x [B, L, H, D] (inverse: the transpose)"),
    OpSchema("rms_norm", _args("x: Tensor, weight: Tensor, eps: float"), "Tensor",
             doc="RMSNorm over the last dimension (inference kernels)"),
    OpSchema("self_attention", _args(_SELF), "Tensor",
             doc="fused RoPE + GQA self-attention, inference"),
    OpSchema("self_attention_with_lse", _args(_SELF + _DETERMINISTIC), "(Tensor, Tensor)",
             doc="self-attention returning (out, lse) for training"),
    OpSchema("cross_attention", _args(_CROSS), "Tensor",
             doc="queries against static encoder K/V, inference"),
    OpSchema("cross_attention_with_lse", _args(_CROSS + _DETERMINISTIC), "(Tensor, Tensor)",
             doc="cross-attention returning (out, lse) for training"),
    OpSchema("attention_backward",
             _args("grad_out: Tensor, " + _SELF.replace("key_padding_mask", "out: Tensor, "
                                                       "lse: Tensor, key_padding_mask")
                   + ", need_dq: bool, need_dkv: bool" + _DETERMINISTIC),
             "(Tensor, Tensor, Tensor)",
             doc="(dq, dk, dv) w.r.t. the inputs before RoPE; unrequested ones are empty"),
    OpSchema("decode_attention",
             _args("q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, "
                   "key_padding_mask: Tensor?, scale: float"), "Tensor",
             doc="new queries against a preallocated KV cache"),
    OpSchema("append_kv_cache",
             _args("q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, "
                   "cache_seqlens: Tensor, rope: Rope?"), "Tensor",
             mutates=("k_cache", "v_cache"),
             doc="rotate new q/k, write k/v into the caches; returns the rotated q"),
    OpSchema("distill_loss",
             _args("student_hidden: Tensor, lm_head_weight: Tensor, teacher_logits: Tensor, "
                   f"labels: Tensor, {_DISTILL}, chunk_size: int, want_grad_hidden: bool, "
                   "want_grad_weight: bool"), "(Tensor, Tensor, Tensor)",
             doc="(loss, dloss/dhidden, dloss/dweight); chunk_size 0 = automatic"),
    OpSchema("distill_loss_from_logits",
             _args(f"student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, {_DISTILL}, "
                   "want_grad: bool"), "(Tensor, Tensor)",
             doc="(loss, dloss/dlogits)"),
    OpSchema("distill_loss_from_teacher_hidden",
             _args("student_hidden: Tensor, lm_head_weight: Tensor, teacher_hidden: Tensor, "
                   f"teacher_head_weight: Tensor, labels: Tensor, {_DISTILL}, chunk_size: int, "
                   "want_grad_hidden: bool, want_grad_weight: bool"),
             "(Tensor, Tensor, Tensor)",
             doc="(loss, dloss/dhidden, dloss/dweight), teacher LM head fused too"),
)}


def flatten(schema: OpSchema, args: tuple) -> tuple:
    """Canonical arguments -> the custom op's flat arguments (``Rope?`` as five scalars)."""
    i = schema.rope_index
    if i is None:
        return args
    rope = args[i]
    if rope is None:
        fields = (False, 10000.0, 1.0, 0, -1)
    else:
        fields = (True, float(rope.theta), float(rope.scaling_factor),
                  rope.max_position_embeddings or 0,
                  -1 if rope.seq_len is None else rope.seq_len)
    return args[:i] + fields + args[i + 1:]


def unflatten(schema: OpSchema, flat: tuple) -> tuple:
    """The custom op's flat arguments -> canonical arguments."""
    i = schema.rope_index
    if i is None:
        return flat
    on, theta, factor, max_pos, seq_len = flat[i:i + 5]
    rope = Rope(theta, factor, max_pos or None, None if seq_len < 0 else seq_len) if on else None
    return flat[:i] + (rope,) + flat[i + 5:]
