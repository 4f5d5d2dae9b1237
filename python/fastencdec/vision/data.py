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

from ..data.collate import Seq2SeqCollator
from .anyres import AnyResConfig, normalize, process_image, stack_images
from .image_io import ImageError

__all__ = ["BadRow", "read_image_text_jsonl", "ImageTextData", "ImageTextCollator",
           "load_image_text_examples"]

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
    fields = dict(fields or {})
    unknown = sorted(set(fields) - {"image", "source", "target"})
    if unknown:
        raise ValueError(f"unknown image-text fields {unknown}; known: image, source, target")
    names = {f"{k}_field": v for k, v in fields.items()}
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    examples, bad = [], []
    for file in files:
        data = read_image_text_jsonl(file, **names)
        bad += data.bad
        for rec in data.records:
            try:
                crops = process_image(rec["image"], anyres).crops
            except ImageError as err:
                bad.append(BadRow(rec["file"], rec["row"], str(err)))
                continue
            ex = encoder({"source": rec["source"], "target": rec["target"]})
            ex["image_crops"] = crops
            ex["row"] = rec["row"]
            examples.append(ex)
    bad.sort(key=lambda b: (b.file, b.row))
    if bad:
        listing = "; ".join(str(b) for b in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if on_bad_row == "error":
            raise ValueError(f"{len(bad)} bad image-text row(s), nothing trained: {listing}")
        warnings.warn(f"skipped {len(bad)} bad image-text row(s): {listing}", stacklevel=2)
    if not examples:
        raise ValueError(f"no usable image-text rows in {[os.fspath(f) for f in files]}")
    return examples, bad


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
        if tokens_per_crop is not None and (isinstance(tokens_per_crop, bool) or
                                            not isinstance(tokens_per_crop, int)
                                            or tokens_per_crop < 1):
            raise ValueError(f"tokens_per_crop must be a positive int or None, "
                             f"got {tokens_per_crop!r}")
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
        pixels = []
        for i, ex in enumerate(examples):
            if "image_crops" not in ex:
                raise KeyError(f"example {i} has no 'image_crops'")
            crops = ex["image_crops"]
            pixels.append(None if crops is None or len(crops) == 0
                          else normalize(crops, self.anyres.mean, self.anyres.std))
        if all(p is None for p in pixels):
            return batch
        batch["image_pixels"], batch["image_crop_mask"] = stack_images(pixels)
        if self.tokens_per_crop is not None:
            batch["image_slots"] = True
        return batch


def _n_crops(example: Mapping) -> int:
    crops = example.get("image_crops")
    return 0 if crops is None else len(crops)
