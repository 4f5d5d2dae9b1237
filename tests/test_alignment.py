"""Teacher/student alignment for distillation (DESIGN §4).

The key test runs one causal function as both models: on the student's decoder
input ``[BOS] ∘ y[:-1]`` and on the teacher's ``pad ∘ x ∘ y ∘ pad`` (each source
ending with the BOS token, so both see the same prefix for ``y_<t``). After
alignment the divergence must be 0, and clearly not 0 one position off.
"""

from __future__ import annotations

import pytest
import torch

import fastencdec.ops as ops
import fastencdec.reference as ref
from fastencdec.training import (
    align_teacher_logits,
    build_student_decoder_inputs,
    build_teacher_inputs,
)

PAD, BOS, VOCAB = 0, 1, 40


def _causal_model(ids, mask, positions, emb, out):
    """Logits at j from the real tokens since the last BOS at or before j, weighted by
    relative position: a function of the prefix only, blind to anything before BOS."""
    batch, length = ids.shape
    logits = torch.zeros(batch, length, out.shape[1], dtype=torch.float64)
    for b in range(batch):
        start = None
        for j in range(length):
            if mask[b, j] and ids[b, j] == BOS:
                start = j
            if not mask[b, j] or start is None:
                continue
            state = torch.zeros(emb.shape[1], dtype=torch.float64)
            for i in range(start, j + 1):
                if mask[b, i]:
                    state += emb[ids[b, i]] * 0.8 ** float(positions[b, j] - positions[b, i])
            logits[b, j] = torch.tanh(state) @ out
    return logits


def _batch(gen):
    """Sources of lengths 2..5 (arbitrary padding side per row) ending in BOS, and
    right-padded targets of lengths 1..4."""
    src_lens, tgt_lens = [2, 5, 3], [4, 1, 3]
    lx, ly = 5, 4
    source = torch.randint(2, VOCAB, (3, lx), generator=gen)
    source_mask = torch.zeros(3, lx, dtype=torch.bool)
    for b, n in enumerate(src_lens):
        cols = range(n) if b % 2 == 0 else range(lx - n, lx)  # right- or left-padded
        source_mask[b, list(cols)] = True
        source[b, list(cols)[-1]] = BOS
    source = source.masked_fill(~source_mask, PAD)
    target = torch.randint(2, VOCAB, (3, ly), generator=gen)
    target_mask = torch.arange(ly)[None, :] < torch.tensor(tgt_lens)[:, None]
    return source, source_mask, target.masked_fill(~target_mask, PAD), target_mask


def _divergence(student, teacher, labels, divergence):
    vocab = student.shape[-1]
    return float(ref.distill_loss_from_logits(
        student.reshape(-1, vocab), teacher.reshape(-1, vocab), labels.reshape(-1),
        alpha=1.0, divergence=divergence))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_same_function_teacher_has_zero_divergence(backend, seed, divergence):
    backend("triton")
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(VOCAB, 8, generator=gen, dtype=torch.float64)
    out = torch.randn(8, VOCAB, generator=gen, dtype=torch.float64) * 3
    source, source_mask, target, target_mask = _batch(gen)
    ly = target.shape[1]

    student_in = build_student_decoder_inputs(target, target_mask, BOS, PAD)
    student_pos = (student_in.attention_mask.long().cumsum(1) - 1).clamp(min=0)
    student = _causal_model(student_in.input_ids, student_in.attention_mask, student_pos,
                            emb, out)
    teacher_in = build_teacher_inputs(source, source_mask, target, target_mask, PAD)
    teacher = _causal_model(teacher_in.input_ids, teacher_in.attention_mask,
                            teacher_in.position_ids, emb, out)

    aligned = align_teacher_logits(teacher, teacher_in.source_len, ly)
    assert _divergence(student, aligned, student_in.labels, divergence) < 1e-12
    lx = teacher_in.source_len
    for start in (lx - 2, lx):  # one position early / late
        shifted = teacher[:, start : start + ly]
        assert _divergence(student, shifted, student_in.labels, divergence) > 1e-2

    # The fused kernel agrees (fp32 logits, student and teacher equal: KL = 0 to rounding).
    labels = student_in.labels.reshape(-1)
    loss = ops.distill_loss_from_logits(student.reshape(-1, VOCAB).float(),
                                        aligned.reshape(-1, VOCAB).float(), labels, alpha=1.0,
                                        divergence=divergence)
    assert abs(float(loss)) < 1e-5


def test_student_logits_planted_in_teacher_are_recovered(seed):
    """Rows planted at Lx-1+t inside a longer random tensor come back exactly."""
    batch, lx, ly, vocab = 2, 6, 3, 11
    teacher = torch.randn(batch, lx + ly + 2, vocab)
    planted = torch.randn(batch, ly, vocab)
    teacher[:, lx - 1 : lx - 1 + ly] = planted
    assert torch.equal(align_teacher_logits(teacher, lx, ly), planted)


def test_builders_on_a_small_example():
    source = torch.tensor([[5, 6, PAD], [PAD, 7, 8]])
    source_mask = torch.tensor([[True, True, False], [False, True, True]])
    target = torch.tensor([[9, 10, PAD], [11, PAD, PAD]])
    target_mask = torch.tensor([[True, True, False], [True, False, False]])

    t = build_teacher_inputs(source, source_mask, target, target_mask, PAD)
    assert t.source_len == 3
    assert t.input_ids.tolist() == [[PAD, 5, 6, 9, 10, PAD], [PAD, 7, 8, 11, PAD, PAD]]
    assert t.attention_mask.tolist() == [[False, True, True, True, True, False],
                                         [False, True, True, True, False, False]]
    assert t.position_ids[0, 1:5].tolist() == [0, 1, 2, 3]
    assert t.position_ids[1, 1:4].tolist() == [0, 1, 2]

    s = build_student_decoder_inputs(target, target_mask, BOS, PAD)
    assert s.input_ids.tolist() == [[BOS, 9, PAD], [BOS, PAD, PAD]]
    assert s.labels.tolist() == [[9, 10, -100], [11, -100, -100]]
    assert s.attention_mask.tolist() == target_mask.tolist()
    labels = build_student_decoder_inputs(target, target_mask, BOS, PAD, ignore_index=-1).labels
    assert labels.tolist() == [[9, 10, -1], [11, -1, -1]]


def test_alignment_errors():
    logits = torch.randn(2, 7, 5)
    with pytest.raises(ValueError, match="teacher_logits"):
        align_teacher_logits(logits[0], 3, 2)
    with pytest.raises(ValueError, match="source_len"):
        align_teacher_logits(logits, 0, 2)
    with pytest.raises(TypeError, match="target_len"):
        align_teacher_logits(logits, 3, 2.0)
    with pytest.raises(ValueError, match="7 positions"):
        align_teacher_logits(logits, 5, 4)

    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="right-padded"):
        build_student_decoder_inputs(ids, torch.tensor([[False, True, True]] * 2), BOS, PAD)
    with pytest.raises(TypeError, match="target_mask"):
        build_student_decoder_inputs(ids, mask.long(), BOS, PAD)
    with pytest.raises(ValueError, match="source_mask row 1"):
        build_teacher_inputs(ids, torch.tensor([[True] * 3, [False] * 3]), ids, mask, PAD)
    with pytest.raises(TypeError, match="source_ids"):
        build_teacher_inputs(ids.float(), mask, ids, mask, PAD)
    with pytest.raises(ValueError, match="target_ids has batch"):
        build_teacher_inputs(ids, mask, ids[:1], mask[:1], PAD)
