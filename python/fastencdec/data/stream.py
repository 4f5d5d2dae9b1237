"""An endless, resumable stream of collated batches over epochs.

``BatchStream`` remembers where it is (epoch and batch position), so a checkpoint
can store ``state_dict()`` and a resumed run continues with the very next batch.
With several processes, rank ``r`` of ``world_size`` takes global batches
``r, r + world_size, ...`` of each epoch — the same batches that one process with
``world_size``-fold gradient accumulation would take, in the same order.

A collate function may define ``reseed(key)``: it is called before each batch with
``(epoch, global_batch_index)`` so that random collators (span corruption) are a
pure function of the batch, whichever process or restart produces it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["BatchStream"]


class BatchStream:
    def __init__(self, examples: Sequence, batch_sampler, collate_fn: Callable, *,
                 rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.examples = examples
        self.batch_sampler = batch_sampler
        self.collate_fn = collate_fn
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # batches of this rank already taken in this epoch
        self._epoch_batches: list | None = None

    def _batches(self) -> list:
        if self._epoch_batches is None:
            if hasattr(self.batch_sampler, "batches"):
                all_batches = self.batch_sampler.batches(self.epoch)
            else:  # a plain batch sampler: ask for this epoch then iterate
                if hasattr(self.batch_sampler, "set_epoch"):
                    self.batch_sampler.set_epoch(self.epoch)
                all_batches = list(self.batch_sampler)
            # every rank takes the same number of batches (the remainder is dropped)
            usable = len(all_batches) // self.world_size * self.world_size
            if usable == 0:
                raise ValueError(f"an epoch has {len(all_batches)} batches, fewer than "
                                 f"world_size={self.world_size}")
            self._epoch_batches = list(enumerate(all_batches[:usable]))[self.rank::self.world_size]
        return self._epoch_batches

    def __iter__(self):
        return self

    def __next__(self):
        batches = self._batches()
        if self.position >= len(batches):
            self.epoch += 1
            self.position = 0
            self._epoch_batches = None
            batches = self._batches()
        global_index, indices = batches[self.position]
        self.position += 1
        if hasattr(self.collate_fn, "reseed"):
            self.collate_fn.reseed((self.epoch, global_index))
        return self.collate_fn([self.examples[i] for i in indices])

    def batches_per_epoch(self) -> int:
        return len(self._batches())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._epoch_batches = None
