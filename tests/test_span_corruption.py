"""T5 span corruption checked against its definition on known inputs."""

import numpy as np
import pytest
import torch

from fastencdec.data import SpanCorruptionCollator, random_spans_noise_mask, span_corrupt
from fastencdec.data.span_corruption import chunk_tokens

SENTINELS = list(range(1000, 1100))
EOS = 2


def _runs(mask):
    """Lengths of the True runs of a bool array."""
    runs, n = [], 0
    for m in list(mask) + [False]:
        if m:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


@pytest.mark.parametrize("length", [2, 3, 10, 20, 57, 100, 512])
def test_noise_mask_counts(length):
    rng = np.random.default_rng(length)
    mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
    num_noise = min(max(round(length * 0.15), 1), length - 1)
    num_spans = min(max(round(num_noise / 3.0), 1), length - num_noise)
    assert mask.dtype == bool and mask.shape == (length,)
    assert mask.sum() == num_noise
    assert len(_runs(mask)) == num_spans
    assert not mask[0]  # spans alternate starting with kept tokens
    assert mask[-1]     # ... and end with noise (T5's layout)


def test_known_input_reconstructs():
    ids = list(range(10, 30))  # 20 tokens: 3 noise tokens in 1 span
    inputs, targets = span_corrupt(ids, SENTINELS, EOS, np.random.default_rng(0))
    assert inputs.count(SENTINELS[0]) == 1 and SENTINELS[1] not in inputs
    assert targets[0] == SENTINELS[0] and targets[-1] == EOS and inputs[-1] == EOS
    assert len(targets) == 1 + 3 + 1
    assert len(inputs) == 20 - 3 + 1 + 1
    # the dropped span is the 3 tokens that followed the kept prefix
    cut = inputs.index(SENTINELS[0])
    assert targets[1:4] == ids[cut:cut + 3]


def reconstruct(inputs, targets):
    spans, current = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_reconstruction_and_lengths(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 900, size=int(rng.integers(2, 300))).tolist()
    inputs, targets = span_corrupt(ids, SENTINELS, EOS, np.random.default_rng(seed))
    assert reconstruct(inputs, targets) == ids
    used = [t for t in targets if t in SENTINELS]
    assert used == SENTINELS[: len(used)]  # sentinels in order, one per span
    noise = len(targets) - len(used) - 1
    assert noise == min(max(round(len(ids) * 0.15), 1), len(ids) - 1)
    assert len(inputs) == len(ids) - noise + len(used) + 1


def test_deterministic_under_seed():
    examples = [{"input_ids": list(range(5, 5 + n))} for n in (30, 47, 64)]
    a = SpanCorruptionCollator(SENTINELS, eos_id=EOS, seed=7)(examples)
    b = SpanCorruptionCollator(SENTINELS, eos_id=EOS, seed=7)(examples)
    c = SpanCorruptionCollator(SENTINELS, eos_id=EOS, seed=8)(examples)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert any(a[k].shape != c[k].shape or not torch.equal(a[k], c[k]) for k in a)
    # reseed(key) makes a batch a function of (seed, key) alone
    coll = SpanCorruptionCollator(SENTINELS, eos_id=EOS, seed=7)
    coll(examples)
    coll.reseed((0, 3))
    first = coll(examples)
    coll.reseed((0, 3))
    assert torch.equal(coll(examples)["labels"], first["labels"])


def test_collator_batch_layout():
    examples = [{"input_ids": list(range(5, 45))}, {"input_ids": list(range(5, 25))}]
    batch = SpanCorruptionCollator(SENTINELS, eos_id=EOS, pad_id=0, bos_id=1, seed=0)(examples)
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    assert (dec[:, 0] == 1).all()
    real = labels != -100
    assert torch.equal(real, batch["decoder_attention_mask"])
    # decoder inputs are the labels shifted right by one
    assert torch.equal(dec[:, 1:][real[:, 1:]], labels[:, :-1][real[:, 1:]])
    assert set(labels[real][:1].tolist()) <= set(SENTINELS)


def test_errors():
    with pytest.raises(ValueError, match="noise_density"):
        SpanCorruptionCollator(SENTINELS, eos_id=EOS, noise_density=0.0)
    with pytest.raises(ValueError, match="sentinel"):
        span_corrupt(list(range(400)), SENTINELS[:2], EOS, np.random.default_rng(0))
    with pytest.raises(ValueError, match="sentinel_ids"):
        SpanCorruptionCollator([], eos_id=EOS)


def test_chunk_tokens():
    chunks = chunk_tokens([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, separator=0)
    assert [c["input_ids"] for c in chunks] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
