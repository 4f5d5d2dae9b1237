"""Bad inputs raise clear Python errors naming the argument (never a crash or a broadcast)."""

import pytest
import torch

from fastencdec import ops


def qkv(b=2, lq=5, lk=5, hq=4, hkv=2, d=8, dtype=torch.float32):
    return (torch.randn(b, lq, hq, d, dtype=dtype), torch.randn(b, lk, hkv, d, dtype=dtype),
            torch.randn(b, lk, hkv, d, dtype=dtype))


def self_attn(q, k, v, **kw):
    kw.setdefault("causal", False)
    return ops.self_attention(q, k, v, **kw)


CASES = [
    # (description, call, exception, words the message must contain)
    ("q rank", lambda: self_attn(torch.randn(2, 5, 32), *qkv()[1:]), ValueError, ["q", "4-D"]),
    ("k rank", lambda: self_attn(qkv()[0], torch.randn(2, 5, 16), qkv()[2]), ValueError, ["k", "4-D"]),
    ("not a tensor", lambda: self_attn([[1.0]], *qkv()[1:]), TypeError, ["q", "torch.Tensor"]),
    ("int dtype", lambda: self_attn(torch.ones(2, 5, 4, 8, dtype=torch.int32), *qkv()[1:]),
     TypeError, ["q", "dtype"]),
    ("mixed dtypes", lambda: self_attn(qkv()[0].half(), *qkv()[1:]), TypeError, ["dtype"]),
    ("batch mismatch", lambda: self_attn(qkv()[0], *qkv(b=3)[1:]), ValueError, ["k", "batch"]),
    ("head_dim mismatch", lambda: self_attn(qkv()[0], *qkv(d=16)[1:]), ValueError, ["head_dim"]),
    ("k/v shape", lambda: self_attn(qkv()[0], qkv()[1], qkv(hkv=4)[2]), ValueError, ["k", "v"]),
    ("heads not multiple", lambda: self_attn(*qkv(hq=6, hkv=4)), ValueError, ["multiple"]),
    ("self-attn lengths", lambda: self_attn(*qkv(lk=6)), ValueError, ["seq length"]),
    ("mask dtype", lambda: self_attn(*qkv(), key_padding_mask=torch.ones(2, 5)), TypeError,
     ["key_padding_mask", "bool"]),
    ("mask shape", lambda: self_attn(*qkv(), key_padding_mask=torch.ones(2, 4, dtype=torch.bool)),
     ValueError, ["key_padding_mask", "[2, 5]"]),
    ("mask broadcast", lambda: self_attn(*qkv(), key_padding_mask=torch.ones(1, 5, dtype=torch.bool)),
     ValueError, ["key_padding_mask"]),
    ("positions shape", lambda: self_attn(*qkv(), positions=torch.zeros(2, 4, dtype=torch.long)),
     ValueError, ["positions"]),
    ("positions dtype", lambda: self_attn(*qkv(), positions=torch.zeros(2, 5)), TypeError,
     ["positions", "int"]),
    ("negative offset", lambda: self_attn(*qkv(), positions=-1), ValueError, ["positions"]),
    ("odd head_dim rope", lambda: self_attn(*qkv(d=7)), ValueError, ["even"]),
    ("empty seq", lambda: self_attn(*qkv(lq=0, lk=0)), ValueError, ["empty"]),
    ("ntk without max", lambda: self_attn(*qkv(), rope_scaling_factor=2.0), ValueError,
     ["max_position_embeddings"]),
    ("scale type", lambda: self_attn(*qkv(), scale="x"), TypeError, ["scale"]),
    ("cross mask length", lambda: ops.cross_attention(
        *qkv(lk=7), key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
     ValueError, ["key_padding_mask", "[2, 7]"]),
    ("cross heads", lambda: ops.cross_attention(*qkv(hq=5, hkv=2, lk=7)), ValueError, ["multiple"]),
    ("decode lens dtype", lambda: ops.decode_attention(
        *qkv(lq=1, lk=9), torch.zeros(2)), TypeError, ["cache_seqlens"]),
    ("decode lens shape", lambda: ops.decode_attention(
        *qkv(lq=1, lk=9), torch.zeros(3, dtype=torch.int32)), ValueError, ["cache_seqlens"]),
    ("decode lens range", lambda: ops.decode_attention(
        *qkv(lq=1, lk=9), torch.tensor([3, 10])), ValueError, ["cache_seqlens", "[0, 9]"]),
    ("append overflow", lambda: ops.append_kv_cache(
        *qkv(lq=2, lk=2), torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8), torch.tensor([1, 3])),
     ValueError, ["exceeds"]),
    ("append cache heads", lambda: ops.append_kv_cache(
        *qkv(lq=1, lk=1), torch.zeros(2, 4, 4, 8), torch.zeros(2, 4, 4, 8), torch.tensor([0, 0])),
     ValueError, ["k_cache"]),
    ("rope rank", lambda: ops.apply_rope(torch.randn(3, 8)), ValueError, ["x", "4-D"]),
    ("rope theta", lambda: ops.apply_rope(torch.randn(1, 2, 1, 8), 0, theta=0.0), ValueError,
     ["theta"]),
]


@pytest.mark.parametrize("desc,call,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_attention_inputs(desc, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{desc}: {word!r} not in {info.value}"


def distill_args(n=6, d=4, vs=11, vt=13):
    return (torch.randn(n, d), torch.randn(vs, d), torch.randn(n, vt),
            torch.randint(0, vs, (n,)))


DISTILL_CASES = [
    ("hidden rank", lambda: ops.distill_loss(torch.randn(2, 3, 4), *distill_args()[1:]),
     ValueError, ["student_hidden"]),
    ("d mismatch", lambda: ops.distill_loss(torch.randn(6, 5), *distill_args()[1:]), ValueError,
     ["lm_head_weight", "d_model"]),
    ("rows mismatch", lambda: ops.distill_loss(*distill_args()[:2], torch.randn(5, 13),
                                               distill_args()[3]), ValueError, ["teacher_logits"]),
    ("labels dtype", lambda: ops.distill_loss(*distill_args()[:3], torch.zeros(6)), TypeError,
     ["labels"]),
    ("labels range", lambda: ops.distill_loss(*distill_args()[:3], torch.full((6,), 11)),
     ValueError, ["labels", "[0, 11)"]),
    ("alpha", lambda: ops.distill_loss(*distill_args(), alpha=1.5), ValueError, ["alpha"]),
    ("temperature", lambda: ops.distill_loss(*distill_args(), temperature=0.0), ValueError,
     ["temperature"]),
    ("divergence", lambda: ops.distill_loss(*distill_args(), divergence="jsd"), ValueError,
     ["divergence"]),
    ("chunk", lambda: ops.distill_loss(*distill_args(), chunk_size=0), ValueError, ["chunk_size"]),
    ("logits labels", lambda: ops.distill_loss_from_logits(
        torch.randn(4, 9), torch.randn(4, 9), torch.zeros(3, dtype=torch.long)), ValueError,
     ["labels"]),
]


@pytest.mark.parametrize("desc,call,exc,words", DISTILL_CASES, ids=[c[0] for c in DISTILL_CASES])
def test_bad_distill_inputs(desc, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{desc}: {word!r} not in {info.value}"


def test_meta_device_rejected():
    q = torch.empty(1, 2, 2, 8, device="meta")
    with pytest.raises(ValueError, match="CPU or CUDA"):
        ops.self_attention(q, q, q, causal=False)
