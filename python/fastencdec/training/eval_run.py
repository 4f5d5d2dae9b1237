"""``fastencdec eval --model DIR --data FILE``: the trainer's held-out evaluation on a
saved model (cross-entropy per target token, exact match, token F1, ROUGE-L). A saved
vision-language model is evaluated on image + text JSONL (``image_text``; bad rows are
skipped and reported by row number)."""

from __future__ import annotations

import json
import os

from ..data import load_records, load_tokenizer
from .checks import ConfigError
from .run_config import build_evaluator, load_model_dir, read_image_text_records
from .run_schema import DATA_FORMATS, is_vlm_config

__all__ = ["evaluate_saved_model", "guess_format"]


def guess_format(record: dict) -> str:
    for name, fmt in DATA_FORMATS.items():
        if name == "image_text":  # read only for a vision-language model
            continue
        if fmt.generates and all(field in record for field in fmt.fields.values()):
            return name
    choices = ", ".join(n for n, f in DATA_FORMATS.items() if f.generates)
    raise ConfigError(f"cannot tell the data format from a record with fields {sorted(record)}: "
                      f"pass --format ({choices})")


def evaluate_saved_model(model_dir: str, data: str, *, fmt: str | None = None,
                         tokenizer: str | None = None, device: str = "cpu",
                         max_examples: int = 500, batch_size: int = 32,
                         max_source_len: int | None = None, max_new_tokens: int = 32,
                         split: str = "validation", predictions: str | None = None) -> dict:
    """Metrics of the model saved in ``model_dir`` on the records of ``data``."""
    model = load_model_dir(model_dir, device=device)
    tok = load_tokenizer(tokenizer or model_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                          f"{model.config.vocab_size}: they do not belong together")
    vlm = is_vlm_config(model.config)
    if vlm:
        if fmt not in (None, "image_text"):
            raise ConfigError(f"{model_dir} is a vision-language model: it is evaluated on "
                              f"--format image_text, not {fmt}")
        fmt = "image_text"
        fields = dict(DATA_FORMATS[fmt].fields)
        records = read_image_text_records(data, {"fields": fields, "on_bad_row": "skip"},
                                          model.config.anyres, where=data)
    else:
        if fmt == "image_text":
            raise ConfigError(f"--format image_text needs a vision-language model; {model_dir} "
                              "is a text model")
        records = load_records(data, split=split)
        if len(records) == 0:
            raise ConfigError(f"{data} holds no records")
        fmt = fmt or guess_format(records[0])
    if fmt not in DATA_FORMATS or not DATA_FORMATS[fmt].generates:
        raise ConfigError(f"--format must be one of "
                          f"{', '.join(n for n, f in DATA_FORMATS.items() if f.generates)}")
    limit = model.config.max_position_embeddings
    if vlm:
        limit -= model.config.max_image_tokens
    if (model.config.text if vlm else model.config).architecture == "decoder_only":
        limit -= max_new_tokens
    source_len = min(limit, 512) if max_source_len is None else max_source_len
    if source_len < 1 or source_len > limit:
        raise ConfigError(f"--max-source-len must lie in [1, {limit}] for this model, got "
                          f"{source_len}")
    spec = {"format": fmt, "fields": dict(DATA_FORMATS[fmt].fields),
            "max_source_len": source_len, "max_target_len": max_new_tokens}
    evaluator = build_evaluator(records, tok, spec,
                                {"max_examples": max_examples, "batch_size": batch_size,
                                 "max_new_tokens": max_new_tokens, "generate": True},
                                model.config)
    result = evaluator(model)
    if predictions is not None:
        os.makedirs(os.path.dirname(os.path.abspath(predictions)), exist_ok=True)
        with open(predictions, "w", encoding="utf-8") as fh:
            for pred, ref in zip(evaluator.predictions, evaluator.references, strict=True):
                fh.write(json.dumps({"prediction": pred, "reference": ref}) + "\n")
    return {"model": model_dir, "data": data, "format": fmt, **result}
