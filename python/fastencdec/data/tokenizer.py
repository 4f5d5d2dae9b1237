"""A sentencepiece tokenizer with the special ids fastencdec's models expect.

Ids: ``pad = 0``, ``bos = 1``, ``eos = 2``, ``unk = 3``, then ``num_sentinels``
sentinel tokens ``<extra_id_0> ... <extra_id_{N-1}>`` (user-defined symbols, used by
span corruption), then the learned pieces. An existing ``.model`` file with other
ids can be loaded too; its ids are read from the model.

Batch helpers return torch tensors: ``input_ids`` (int64) and ``attention_mask``
(bool, ``True`` = a real token), padded on the right unless asked otherwise. Encoding
and decoding alone never import torch (the torch-free runtime's command line uses them).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Tokenizer", "TokenizerBase", "sentinel_piece", "pad_sequences"]

TOKENIZER_FILE = "tokenizer.model"


def sentinel_piece(i: int) -> str:
    return f"<extra_id_{i}>"


def _spm():
    import sentencepiece

    return sentencepiece


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    padding_side: str = "right",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids into ``(ids [B, L] int64, mask [B, L] bool)``.

    ``L`` is the longest sequence (at least 1), or ``max_length`` when given (longer
    sequences are an error here: truncate first), rounded up to ``pad_to_multiple_of``.
    """
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    longest = max((len(s) for s in sequences), default=0)
    if max_length is not None:
        if longest > max_length:
            raise ValueError(f"a sequence has {longest} tokens > max_length={max_length}; "
                             "truncate before padding")
        longest = max_length
    longest = max(longest, 1)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = True
    return ids, mask


class TokenizerBase:
    """What every tokenizer here offers (sentencepiece ``.model`` files and
    ``tokenizer.json`` files alike): special ids, batch encode/decode with padding.

    A subclass provides ``vocab_size``, ``pad_id``/``bos_id``/``eos_id``/``unk_id``,
    ``id_to_piece``/``piece_to_id``, ``_encode_text``, ``_decode_ids`` and ``save``.
    """

    sentinel_ids: list[int]

    def _find_sentinels(self) -> list[int]:
        ids, i = [], 0
        while True:
            pid = self.piece_to_id(sentinel_piece(i))
            if pid is None or pid < 0 or pid == self.unk_id or \
                    self.id_to_piece(pid) != sentinel_piece(i):
                return ids
            ids.append(pid)
            i += 1

    @property
    def num_sentinels(self) -> int:
        return len(self.sentinel_ids)

    def special_ids(self) -> set[int]:
        return {i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None and i >= 0}

    def __len__(self) -> int:
        return self.vocab_size

    def pieces(self) -> list[str]:
        """The token string of every id (to compare two vocabularies)."""
        return [self.id_to_piece(i) for i in range(self.vocab_size)]

    # ----------------------------------------------------------------- encode
    def encode(self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
               max_length: int | None = None):
        """Ids of one string (``list[int]``) or of each string in a list.

        ``max_length`` truncates on the right, keeping the EOS when ``add_eos``.
        """
        if isinstance(text, str):
            return self._encode_one(text, add_bos, add_eos, max_length)
        if not isinstance(text, Sequence):
            raise TypeError(f"text must be a str or a sequence of str, got {type(text).__name__}")
        return [self._encode_one(t, add_bos, add_eos, max_length) for t in text]

    def _encode_one(self, text, add_bos, add_eos, max_length):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._encode_text(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if max_length is not None:
            if max_length < 1:
                raise ValueError(f"max_length must be >= 1, got {max_length}")
            keep = max_length - 1 if add_eos else max_length
            ids = ids[:max(keep, 0)]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        add_bos: bool = False,
        add_eos: bool = False,
        max_length: int | None = None,
        padding: str = "longest",
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch-encode: ``{"input_ids": [B, L] int64, "attention_mask": [B, L] bool}``.

        ``padding="longest"`` pads to the longest row; ``"max_length"`` to ``max_length``.
        Rows longer than ``max_length`` are truncated.
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        seqs = self.encode(list(texts), add_bos=add_bos, add_eos=add_eos, max_length=max_length)
        ids, mask = pad_sequences(seqs, self.pad_id, padding_side=padding_side,
                                  max_length=max_length if padding == "max_length" else None,
                                  pad_to_multiple_of=pad_to_multiple_of)
        return {"input_ids": ids, "attention_mask": mask}

    def pad(self, sequences: Sequence[Sequence[int]], **kwargs) -> dict[str, torch.Tensor]:
        ids, mask = pad_sequences(sequences, self.pad_id, **kwargs)
        return {"input_ids": ids, "attention_mask": mask}

    # ----------------------------------------------------------------- decode
    def decode(self, ids, *, skip_special_tokens: bool = True, stop_at_eos: bool = True) -> str:
        """Text of one id sequence (list, 1-D tensor or 1-D numpy array).

        ``stop_at_eos`` cuts at the first EOS; ``skip_special_tokens`` drops pad/bos/eos
        (sentinels are kept: they carry meaning in span-corruption targets).
        """
        if hasattr(ids, "ndim") and hasattr(ids, "tolist"):  # a tensor or an array
            if ids.ndim != 1:
                raise ValueError(f"decode takes one sequence [L], got shape {list(ids.shape)}; "
                                 "use batch_decode")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        if skip_special_tokens:
            special = self.special_ids()
            ids = [i for i in ids if i not in special]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return self._decode_ids(ids)

    def batch_decode(self, batch, **kwargs) -> list[str]:
        if hasattr(batch, "ndim") and hasattr(batch, "tolist"):  # a tensor or an array
            if batch.ndim != 2:
                raise ValueError(f"batch_decode takes [B, L] ids, got shape {list(batch.shape)}")
            batch = batch.tolist()
        return [self.decode(row, **kwargs) for row in batch]


class Tokenizer(TokenizerBase):
    """Wraps a ``sentencepiece`` model. Build with :meth:`train` or :meth:`load`."""

    def __init__(self, model_proto: bytes, *, source: str = "model_proto"):
        if not isinstance(model_proto, (bytes, bytearray)):
            raise TypeError("model_proto must be the bytes of a sentencepiece model; "
                            "use Tokenizer.load(path) for a file")
        self.model_proto = bytes(model_proto)
        if not self.model_proto:
            raise ValueError(f"{source} is empty (expected a sentencepiece .model file)")
        try:
            self.sp = _spm().SentencePieceProcessor(model_proto=self.model_proto)
        except (RuntimeError, OSError, IndexError) as exc:
            raise ValueError(f"{source} is not a valid sentencepiece model (corrupted, or "
                             "another kind of file)") from exc
        if self.sp.get_piece_size() < 1:
            raise ValueError(f"{source} holds a sentencepiece model with no pieces")
        self.sentinel_ids = self._find_sentinels()

    # ----------------------------------------------------------------- building
    @classmethod
    def train(
        cls,
        texts: Iterable[str] | None = None,
        *,
        files: Sequence[str | os.PathLike] | None = None,
        vocab_size: int = 8000,
        num_sentinels: int = 100,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        byte_fallback: bool = False,
        hard_vocab_limit: bool = False,
        max_sentences: int = 2_000_000,
        save_path: str | os.PathLike | None = None,
        **spm_options,
    ) -> Tokenizer:
        """Train on an iterable of strings and/or text ``files`` (one sentence per line).

        ``hard_vocab_limit=False`` lets a small corpus give a smaller vocabulary
        instead of failing. Extra keyword arguments go to ``SentencePieceTrainer``.
        """
        if texts is None and not files:
            raise ValueError("Tokenizer.train needs texts (an iterable of str) or files")
        if num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
        if vocab_size < 4 + num_sentinels + 1:
            raise ValueError(f"vocab_size={vocab_size} leaves no room for pieces after the "
                             f"4 special ids and {num_sentinels} sentinels")
        for f in files or ():
            if not os.path.isfile(f):
                raise FileNotFoundError(f"tokenizer training file not found: {f}")

        def sentences():
            count = 0
            for text in _iter_texts(texts, files):
                for line in text.splitlines():
                    if line.strip():
                        yield line
                        count += 1
                        if count >= max_sentences:
                            return

        writer = io.BytesIO()
        options = dict(
            vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            hard_vocab_limit=hard_vocab_limit,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
            user_defined_symbols=[sentinel_piece(i) for i in range(num_sentinels)],
            minloglevel=2, num_threads=1,  # one thread: the same corpus gives the same model
        )
        options.update(spm_options)
        _spm().SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=writer,
                                         **options)
        tok = cls(writer.getvalue())
        if save_path is not None:
            tok.save(save_path)
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``.model`` file, or a directory holding ``tokenizer.model``."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        with open(path, "rb") as fh:
            return cls(fh.read(), source=f"tokenizer file {path}")

    def save(self, path: str | os.PathLike) -> str:
        """Write the model (a directory gets ``tokenizer.model``); returns the file path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(self.model_proto)
        os.replace(tmp, path)
        return path

    # ----------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def _encode_text(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def _decode_ids(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def _iter_texts(texts, files):
    if texts is not None:
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not one string")
        yield from texts
    for path in files or ():
        with open(path, encoding="utf-8") as fh:
            yield from fh
