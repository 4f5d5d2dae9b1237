"""Length bucketing: batches of examples of similar length (less padding).

Within each epoch the examples are shuffled, cut into windows of
``batch_size * bucket_multiplier``, each window sorted by length and cut into
batches; then the batches are shuffled. The order is a pure function of
``(seed, epoch)``, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LengthBucketBatchSampler", "example_length"]


def example_length(example) -> int:
    """Length used for bucketing: the longer of the source and the target."""
    return max(len(example["input_ids"]), len(example.get("labels", ())))


class LengthBucketBatchSampler:
    """Yields lists of example indices. Usable as a ``DataLoader(batch_sampler=...)``."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, bucket_multiplier: int = 50, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_multiplier < 1:
            raise ValueError(f"bucket_multiplier must be >= 1, got {bucket_multiplier}")
        if len(lengths) == 0:
            raise ValueError("lengths is empty: no examples to batch")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.bucket_multiplier = bucket_multiplier
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        window = self.batch_size * self.bucket_multiplier
        batches = []
        for start in range(0, n, window):
            chunk = order[start:start + window]
            # stable sort: ties keep the shuffled order
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            for b in range(0, len(chunk), self.batch_size):
                batch = chunk[b:b + self.batch_size].tolist()
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        n, window = len(self.lengths), self.batch_size * self.bucket_multiplier
        sizes = [min(window, n - s) for s in range(0, n, window)]
        if self.drop_last:  # each window drops its own short batch
            return sum(size // self.batch_size for size in sizes)
        return sum(-(-size // self.batch_size) for size in sizes)
