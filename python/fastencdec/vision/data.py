"""Image + text training data: JSONL rows ``{"image": path, "source": ..., "target": ...}``.

Image paths are relative to the JSONL file (absolute paths are kept). Every row is
checked before training starts: the JSON, the fields, and the image itself (fully
decoded and cut into crops). A bad row is reported by file and row number (1-based
line); with ``on_bad_row="skip"`` it is left out and counted, with ``"error"``
nothing is trained and one error lists the bad rows. So no run stops mid-epoch on
a bad image.

An encoded example is ``{"input_ids", "labels", "image_crops"}`` (uint8 crops
``[n, S, S, 3]``); :class:`ImageTextCollator` batches them into the seq2seq batch
plus ``image_pixels`` ``[B, C, 3, S, S]`` and ``image_crop_mask`` ``[B, C]``, the
keys a vision-language model's ``encode`` / ``hidden_states`` take.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..argcheck import positive_int
from ..data.collate import Seq2SeqCollator
from .anyres import AnyResConfig, normalize, process_image, stack_images
from .image_io import ImageError

__all__ = ["BadRow", "read_image_text_jsonl", "ImageTextData", "ImageTextCollator",
           "load_image_text_examples", "check_image_text_rows", "encode_image_text",
           "bad_rows_listing", "collate_images", "ON_BAD_ROW"]

ON_BAD_ROW = ("skip", "error")


@dataclass
class BadRow:
    file: str
    row: int       # 1-based line number
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.reason}"


@dataclass
class ImageTextData:
    """Checked rows (``records``: ``{"image": abs path, "source", "target", "row"}``)
    and the rows left out (``bad``)."""

    records: list[dict] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)


def read_image_text_jsonl(path: str | os.PathLike, *, image_field: str = "image",
                          source_field: str = "source",
                          target_field: str = "target") -> ImageTextData:
    """Parse ``path`` row by row (images are not opened here)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image-text data file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    out = ImageTextData()
    with open(path, encoding="utf-8") as fh:
        for row, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                out.bad.append(BadRow(path, row, f"invalid JSON ({err.msg})"))
                continue
            if not isinstance(rec, Mapping):
                out.bad.append(BadRow(path, row, "a row must be a JSON object"))
                continue
            missing = [f for f in (image_field, source_field, target_field) if f not in rec]
            if missing:
                out.bad.append(BadRow(path, row, f"missing field(s) {missing}"))
                continue
            image = rec[image_field]
            if not isinstance(image, str) or not image:
                out.bad.append(BadRow(path, row, f"{image_field!r} must be a non-empty path"))
                continue
            if not all(isinstance(rec[f], str) for f in (source_field, target_field)):
                out.bad.append(BadRow(path, row, f"{source_field!r} and {target_field!r} "
                                                 "must be strings"))
                continue
            if not rec[target_field].strip():
                out.bad.append(BadRow(path, row, f"empty {target_field!r}"))
                continue
            out.records.append({"image": os.path.join(base, os.path.expanduser(image)),
                                "source": rec[source_field], "target": rec[target_field],
                                "row": row, "file": path})
    return out


def _fields(fields: Mapping | None) -> dict:
    fields = dict(fields or {})
    unknown = sorted(set(fields) - {"image", "source", "target"})
    if unknown:
        raise ValueError(f"unknown image-text fields {unknown}; known: image, source, target")
    return {f"{k}_field": v for k, v in fields.items()}


def _files(paths) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def check_image_text_rows(paths: str | os.PathLike | Sequence, anyres: AnyResConfig, *,
                          fields: Mapping | None = None) -> ImageTextData:
    """Read every row of the JSONL file(s) ``paths`` and decode each image now, cut
    into crops: ``records`` carry ``image_crops`` (uint8 ``[n, S, S, 3]``); ``bad``
    holds every row left out (JSON, fields or image), sorted by file and row.
    ``fields``: record field names for the roles ``image``, ``source``, ``target``."""
    names = _fields(fields)
    out = ImageTextData()
    for file in _files(paths):
        data = read_image_text_jsonl(file, **names)
        out.bad += data.bad
        for rec in data.records:
            try:
                crops = process_image(rec["image"], anyres).crops
            except ImageError as err:
                out.bad.append(BadRow(rec["file"], rec["row"], str(err)))
                continue
            out.records.append({**rec, "image_crops": crops})
    out.bad.sort(key=lambda b: (b.file, b.row))
    return out


def bad_rows_listing(bad: Sequence[BadRow], limit: int = 5) -> str:
    """The first ``limit`` bad rows as ``file:row: reason``, ``; ``-separated."""
    return "; ".join(str(b) for b in bad[:limit]) + (" ..." if len(bad) > limit else "")


def encode_image_text(records: Sequence[Mapping], encoder) -> list[dict]:
    """Checked records (:func:`check_image_text_rows`) -> examples ``{"input_ids",
    "labels", "image_crops", "row"}`` (``encoder``: a ``Seq2SeqEncoder``)."""
    examples = []
    for rec in records:
        ex = encoder({"source": rec["source"], "target": rec["target"]})
        ex["image_crops"] = rec["image_crops"]
        ex["row"] = rec["row"]
        examples.append(ex)
    return examples


def load_image_text_examples(paths: str | os.PathLike | Sequence, encoder, anyres: AnyResConfig,
                             *, on_bad_row: str = "skip", fields: Mapping | None = None,
                             ) -> tuple[list[dict], list[BadRow]]:
    """Read, check and encode every row of the JSONL file(s) ``paths``.

    ``encoder``: a :class:`fastencdec.data.Seq2SeqEncoder`. Every image is decoded
    and cut into crops now (kept as uint8), so bad images surface before training.
    Returns ``(examples, bad_rows)``; raises ``ValueError`` when ``on_bad_row`` is
    ``"error"`` and a row is bad, or when no good row is left.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    data = check_image_text_rows(paths, anyres, fields=fields)
    bad = data.bad
    if bad:
        listing = bad_rows_listing(bad)
        if on_bad_row == "error":
            raise ValueError(f"{len(bad)} bad image-text row(s), nothing trained: {listing}")
        warnings.warn(f"skipped {len(bad)} bad image-text row(s): {listing}", stacklevel=2)
    if not data.records:
        raise ValueError(f"no usable image-text rows in {[os.fspath(f) for f in _files(paths)]}")
    return encode_image_text(data.records, encoder), bad


def collate_images(examples: Sequence[Mapping], anyres: AnyResConfig):
    """``(image_pixels [B, C, 3, S, S], image_crop_mask [B, C])`` of the examples'
    ``image_crops`` (normalised with ``anyres``' mean and std), or None when no example
    has an image."""
    pixels = []
    for i, ex in enumerate(examples):
        if "image_crops" not in ex:
            raise KeyError(f"example {i} has no 'image_crops'")
        crops = ex["image_crops"]
        pixels.append(None if crops is None or len(crops) == 0
                      else normalize(crops, anyres.mean, anyres.std))
    if all(p is None for p in pixels):
        return None
    return stack_images(pixels)


class ImageTextCollator:
    """The seq2seq batch (:class:`~fastencdec.data.Seq2SeqCollator`) plus
    ``image_pixels`` (CLIP-normalised float32) and ``image_crop_mask``.

    With ``tokens_per_crop`` (the tower's), each prompt starts with one placeholder
    (``pad_id``, marked real) per image token and the batch holds
    ``image_slots=True``: the model's image tokens fill those slots, so the prompt mask
    is also the encoder's mask (see :mod:`fastencdec.vision.models`). This is the
    layout the ``Trainer`` needs."""

    def __init__(self, anyres: AnyResConfig, *, pad_id: int = 0, bos_id: int = 1,
                 tokens_per_crop: int | None = None, **kwargs):
        tokens_per_crop = positive_int("tokens_per_crop", tokens_per_crop, allow_none=True)
        self.anyres = anyres
        self.pad_id = pad_id
        self.tokens_per_crop = tokens_per_crop
        self.text = Seq2SeqCollator(pad_id=pad_id, bos_id=bos_id, **kwargs)

    @classmethod
    def for_tokenizer(cls, tokenizer, anyres: AnyResConfig, **kwargs) -> ImageTextCollator:
        return cls(anyres, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, **kwargs)

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if self.tokens_per_crop is not None:
            examples = [{**ex, "input_ids": [self.pad_id] * (
                self.tokens_per_crop * _n_crops(ex)) + list(ex["input_ids"])}
                for ex in examples]
        batch = self.text(examples)
        images = collate_images(examples, self.anyres)
        if images is None:
            return batch
        batch["image_pixels"], batch["image_crop_mask"] = images
        if self.tokens_per_crop is not None:
            batch["image_slots"] = True
        return batch


def _n_crops(example: Mapping) -> int:
    crops = example.get("image_crops")
    return 0 if crops is None else len(crops)
