"""Data: tokenizer, loading, seq2seq encoding, batching, span corruption, a synthetic task.

Each piece works alone in a user's own loop (e.g. ``Seq2SeqCollator`` as a
``DataLoader`` ``collate_fn``). Local JSONL/JSON/CSV/text files are read lazily
without extra packages; ``datasets`` is imported only for parquet files and hub
datasets, ``tokenizers`` only for ``tokenizer.json`` files.
"""

from .bucketing import LengthBucketBatchSampler, example_length
from .collate import IGNORE_INDEX, Seq2SeqCollator
from .files import InMemoryRecords
from .json_tokenizer import JsonTokenizer, load_tokenizer
from .lazy import MappedSequence, TextBlocks, approx_lengths
from .seq2seq import (
    QA_PROMPT,
    Seq2SeqEncoder,
    format_qa_prompt,
    qa_record,
    qa_to_seq2seq,
    seq2seq_record,
    to_seq2seq,
)
from .sources import DatasetUnavailableError, load_records
from .span_corruption import (
    SpanCorruptionCollator,
    chunk_tokens,
    random_spans_noise_mask,
    span_corrupt,
)
from .stream import BatchStream
from .synthetic import SyntheticQA
from .tokenizer import Tokenizer, TokenizerBase, pad_sequences

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
