"""Batch encoded seq2seq examples into the tensors an encoder-decoder trains on.

Each example is ``{"input_ids": [...], "labels": [...]}`` (labels = the target ids,
ending with EOS). The batch, all right-padded::

    input_ids          [B, Ls] int64    encoder input (pad id on padding)
    attention_mask     [B, Ls] bool     True = a real token
    decoder_input_ids  [B, Lt] int64    [BOS] + y[:-1]
    decoder_attention_mask [B, Lt] bool
    labels             [B, Lt] int64    y, -100 on padding
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .tokenizer import pad_sequences

__all__ = ["Seq2SeqCollator", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class Seq2SeqCollator:
    def __init__(self, *, pad_id: int = 0, bos_id: int = 1, pad_to_multiple_of: int | None = None,
                 ignore_index: int = IGNORE_INDEX):
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.ignore_index = ignore_index

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> Seq2SeqCollator:
        return cls(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, **kwargs)

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        sources, targets = [], []
        for i, ex in enumerate(examples):
            if "input_ids" not in ex or "labels" not in ex:
                raise KeyError(f"example {i} needs 'input_ids' and 'labels', got {sorted(ex)}")
            if len(ex["labels"]) == 0:
                raise ValueError(f"example {i} has an empty target (labels)")
            sources.append(list(ex["input_ids"]))
            targets.append(list(ex["labels"]))
        input_ids, attention_mask = pad_sequences(sources, self.pad_id,
                                                  pad_to_multiple_of=self.pad_to_multiple_of)
        decoder_inputs = [[self.bos_id] + y[:-1] for y in targets]
        decoder_input_ids, decoder_mask = pad_sequences(
            decoder_inputs, self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
        labels, _ = pad_sequences(targets, self.pad_id,
                                  pad_to_multiple_of=self.pad_to_multiple_of)
        labels = labels.masked_fill(~decoder_mask, self.ignore_index)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_mask,
            "labels": labels,
        }
