"""``tokenizer.json`` tokenizers (Hugging Face ``tokenizers`` library), and one loader for
both kinds of tokenizer file.

The special ids come from, in order: ``special_tokens`` given here, a
``tokenizer_config.json`` / ``special_tokens_map.json`` next to the file, then the
usual token names (``<pad>``, ``<s>``, ``</s>``, ``<|endoftext|>``, ...). Without a
pad token the EOS id pads (padded positions are masked anyway); without a BOS token
the pad id starts the decoder (as in T5). EOS is required.
"""

from __future__ import annotations

import json
import os

from .tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerBase

__all__ = ["JsonTokenizer", "load_tokenizer", "JSON_TOKENIZER_FILE", "SPECIAL_CONFIG_FILE"]

JSON_TOKENIZER_FILE = "tokenizer.json"
SPECIAL_CONFIG_FILE = "tokenizer_config.json"
_GUESSES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "[SEP]"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("tokenizer.json files need the 'tokenizers' package: "
                          "pip install tokenizers (or use a sentencepiece .model file)") from exc
    return tokenizers


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _configured_specials(folder: str) -> dict[str, str]:
    names = {}
    for file in ("special_tokens_map.json", SPECIAL_CONFIG_FILE):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        for kind in _GUESSES:
            name = _token_name(data.get(f"{kind}_token"))
            if name is not None:
                names[kind] = name
    return names


class JsonTokenizer(TokenizerBase):
    """A ``tokenizers.Tokenizer`` with the interface of :class:`~fastencdec.data.Tokenizer`."""

    def __init__(self, tokenizer, *, special_tokens: dict[str, str] | None = None,
                 source: str = "tokenizer"):
        self.tk = tokenizer
        self.source = source
        names = dict(special_tokens or {})
        ids = {}
        for kind, guesses in _GUESSES.items():
            candidates = [names[kind]] if kind in names else list(guesses)
            for name in candidates:
                tid = self.tk.token_to_id(name)
                if tid is not None:
                    ids[kind] = tid
                    names[kind] = name
                    break
            else:
                if kind in (special_tokens or {}):
                    raise ValueError(f"{source}: the {kind} token {names[kind]!r} is not in its "
                                     "vocabulary")
        if "eos" not in ids:
            raise ValueError(f"{source}: no end-of-sequence token found (tried "
                             f"{', '.join(_GUESSES['eos'])}); name it in a "
                             f"{SPECIAL_CONFIG_FILE} next to the file (\"eos_token\")")
        ids.setdefault("pad", ids["eos"])
        ids.setdefault("bos", ids["pad"])
        self._ids = ids
        self.special_tokens = {k: self.tk.id_to_token(v) for k, v in ids.items()}
        self.sentinel_ids = self._find_sentinels()

    @classmethod
    def load(cls, path: str | os.PathLike, *, special_tokens: dict[str, str] | None = None
             ) -> JsonTokenizer:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, JSON_TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"tokenizer file {path} is empty (expected a tokenizer.json)")
        try:
            tk = _tokenizers().Tokenizer.from_file(path)
        except Exception as exc:  # the library raises bare Exceptions on bad files
            raise ValueError(f"tokenizer file {path} is not a valid tokenizer.json "
                             f"({str(exc).splitlines()[0][:120]})") from None
        names = {**_configured_specials(os.path.dirname(path)), **(special_tokens or {})}
        return cls(tk, special_tokens=names, source=f"tokenizer file {path}")

    def save(self, path: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` (a directory gets the file plus the special tokens in
        ``tokenizer_config.json``); returns the file path."""
        path = os.fspath(path)
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        file = os.path.join(path, JSON_TOKENIZER_FILE) if os.path.isdir(path) else path
        tmp = f"{file}.tmp{os.getpid()}"
        self.tk.save(tmp)
        os.replace(tmp, file)
        with open(os.path.join(folder, SPECIAL_CONFIG_FILE), "w", encoding="utf-8") as fh:
            json.dump({f"{k}_token": v for k, v in self.special_tokens.items()}, fh, indent=1)
        return file

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def unk_id(self) -> int:
        return self._ids.get("unk", -1)

    def id_to_piece(self, i: int) -> str:
        piece = self.tk.id_to_token(i)
        return "" if piece is None else piece

    def piece_to_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike, *, special_tokens: dict[str, str] | None = None):
    """A sentencepiece ``.model`` file, a ``tokenizer.json`` file, or a folder holding
    one of them (``tokenizer.model`` first)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (TOKENIZER_FILE, JSON_TOKENIZER_FILE):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), special_tokens=special_tokens)
        raise FileNotFoundError(f"{path} holds no tokenizer ({TOKENIZER_FILE} or "
                                f"{JSON_TOKENIZER_FILE})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.endswith(".json"):
        return JsonTokenizer.load(path, special_tokens=special_tokens)
    return Tokenizer.load(path)
