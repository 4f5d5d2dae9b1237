"""Data: tokenizer, loading, seq2seq encoding, batching, span corruption, a synthetic task.

Each piece works alone in a user's own loop (e.g. ``Seq2SeqCollator`` as a
``DataLoader`` ``collate_fn``). Local JSONL/JSON/CSV/text files are read lazily
without extra packages; ``datasets`` is imported only for parquet files and hub
datasets, ``tokenizers`` only for ``tokenizer.json`` files.

Names load on first use, so the tokenizers (``data.tokenizer``, ``data.json_tokenizer``)
can be imported without torch.
"""

from __future__ import annotations

from .._lazy import lazy_names

# name -> the submodule that defines it
_EXPORTS = {
    "LengthBucketBatchSampler": "bucketing", "example_length": "bucketing",
    "IGNORE_INDEX": "collate", "Seq2SeqCollator": "collate",
    "InMemoryRecords": "files",
    "JsonTokenizer": "json_tokenizer", "load_tokenizer": "json_tokenizer",
    "MappedSequence": "lazy", "TextBlocks": "lazy", "approx_lengths": "lazy",
    "QA_PROMPT": "seq2seq", "Seq2SeqEncoder": "seq2seq", "format_qa_prompt": "seq2seq",
    "qa_record": "seq2seq", "qa_to_seq2seq": "seq2seq", "seq2seq_record": "seq2seq",
    "to_seq2seq": "seq2seq",
    "DatasetUnavailableError": "sources", "load_records": "sources",
    "SpanCorruptionCollator": "span_corruption", "chunk_tokens": "span_corruption",
    "random_spans_noise_mask": "span_corruption", "span_corrupt": "span_corruption",
    "BatchStream": "stream",
    "SyntheticQA": "synthetic",
    "Tokenizer": "tokenizer", "TokenizerBase": "tokenizer", "pad_sequences": "tokenizer",
}

__all__ = [
    "Tokenizer",
    "TokenizerBase",
    "JsonTokenizer",
    "load_tokenizer",
    "pad_sequences",
    "MappedSequence",
    "InMemoryRecords",
    "TextBlocks",
    "approx_lengths",
    "qa_record",
    "seq2seq_record",
    "load_records",
    "DatasetUnavailableError",
    "QA_PROMPT",
    "format_qa_prompt",
    "to_seq2seq",
    "qa_to_seq2seq",
    "Seq2SeqEncoder",
    "Seq2SeqCollator",
    "IGNORE_INDEX",
    "LengthBucketBatchSampler",
    "example_length",
    "BatchStream",
    "SpanCorruptionCollator",
    "span_corrupt",
    "random_spans_noise_mask",
    "chunk_tokens",
    "SyntheticQA",
]


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
