"""T5-style span corruption for pretraining an encoder-decoder.

For a token sequence of length ``L``: ``round(L * noise_density)`` tokens (at least
1, at most ``L - 1``) are noise, split into ``round(noise / mean_span_length)``
spans (at least 1). Noise and kept spans alternate, starting with a kept span
(T5's ``random_spans_noise_mask``). Then::

    encoder input  = kept_0 <s_0> kept_1 <s_1> ... kept_k <s_k> EOS
    decoder target = <s_0> noise_0 <s_1> noise_1 ... <s_k> noise_k EOS

where ``<s_i>`` is the i-th sentinel id. Replacing each sentinel of the input by
the target's span after that sentinel gives back the original sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .collate import IGNORE_INDEX, Seq2SeqCollator

__all__ = [
    "random_spans_noise_mask",
    "span_corrupt",
    "SpanCorruptionCollator",
    "chunk_tokens",
]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
    """Split ``num_items`` into ``num_segments`` positive lengths, uniformly at random."""
    first_in_segment = np.arange(num_items - 1) < num_segments - 1
    rng.shuffle(first_in_segment)
    first_in_segment = np.concatenate([[False], first_in_segment])
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Bool ``[length]``: True = a noise token (dropped from the encoder input)."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must lie in (0, 1), got {noise_density}")
    if not mean_span_length >= 1.0:
        raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length}")
    if length < 2:  # nothing can be dropped while keeping a token
        return np.zeros(length, dtype=bool)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    num_keep = length - num_noise
    num_spans = min(num_spans, num_keep)  # each noise span needs a kept span before it
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(num_keep, num_spans, rng)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    start_indicator = np.zeros(length, dtype=np.int64)
    start_indicator[span_starts] = 1
    return np.cumsum(start_indicator) % 2 == 1


def span_corrupt(ids: Sequence[int], sentinel_ids: Sequence[int], eos_id: int,
                 rng: np.random.Generator, *, noise_density: float = 0.15,
                 mean_span_length: float = 3.0) -> tuple[list[int], list[int]]:
    """``(encoder_input, decoder_target)`` for one sequence (see the module doc)."""
    ids = list(ids)
    mask = random_spans_noise_mask(len(ids), noise_density, mean_span_length, rng)
    inputs, targets = [], []
    span = -1
    for i, token in enumerate(ids):
        if mask[i]:
            if i == 0 or not mask[i - 1]:  # a new noise span
                span += 1
                if span >= len(sentinel_ids):
                    raise ValueError(f"{span + 1}+ noise spans but only {len(sentinel_ids)} "
                                     "sentinel ids: use shorter inputs or more sentinels")
                inputs.append(sentinel_ids[span])
                targets.append(sentinel_ids[span])
            targets.append(token)
        else:
            inputs.append(token)
    return inputs + [eos_id], targets + [eos_id]


class SpanCorruptionCollator:
    """Collate ``{"input_ids": [...]}`` examples into a corrupted seq2seq batch.

    Deterministic under ``seed``: the random state advances with each call, and
    ``reseed(key)`` (called by :class:`~fastencdec.data.BatchStream` per batch)
    makes a batch depend only on ``(seed, key)``.
    """

    def __init__(self, sentinel_ids: Sequence[int], *, eos_id: int, pad_id: int = 0,
                 bos_id: int = 1, noise_density: float = 0.15, mean_span_length: float = 3.0,
                 seed: int = 0, ignore_index: int = IGNORE_INDEX):
        if len(sentinel_ids) == 0:
            raise ValueError("sentinel_ids is empty: train the tokenizer with num_sentinels > 0")
        random_spans_noise_mask(4, noise_density, mean_span_length,
                                np.random.default_rng(0))  # validates the two numbers
        self.sentinel_ids = list(sentinel_ids)
        self.eos_id = eos_id
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.pack = Seq2SeqCollator(pad_id=pad_id, bos_id=bos_id, ignore_index=ignore_index)

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> SpanCorruptionCollator:
        return cls(tokenizer.sentinel_ids, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                   bos_id=tokenizer.bos_id, **kwargs)

    def reseed(self, key: Iterable[int]) -> None:
        self.rng = np.random.default_rng([self.seed, *[int(k) for k in key]])

    def __call__(self, examples: Sequence[Mapping]):
        corrupted = []
        for i, ex in enumerate(examples):
            if "input_ids" not in ex:
                raise KeyError(f"example {i} needs 'input_ids', got {sorted(ex)}")
            inputs, targets = span_corrupt(ex["input_ids"], self.sentinel_ids, self.eos_id,
                                           self.rng, noise_density=self.noise_density,
                                           mean_span_length=self.mean_span_length)
            corrupted.append({"input_ids": inputs, "labels": targets})
        return self.pack(corrupted)


def chunk_tokens(token_lists: Iterable[Sequence[int]], length: int, *,
                 separator: int | None = None, drop_remainder: bool = True) -> list[dict]:
    """Concatenate documents (with ``separator`` between them) and cut ``length``-token
    chunks: the usual way to feed raw text to span corruption."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    stream: list[int] = []
    chunks = []
    for ids in token_lists:
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
        while len(stream) >= length:
            chunks.append({"input_ids": stream[:length]})
            stream = stream[length:]
    if stream and not drop_remainder:
        chunks.append({"input_ids": stream})
    return chunks
