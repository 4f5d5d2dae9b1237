"""The run file's schema: every key of every section checked before any work starts.

:func:`validate_run` returns the run with defaults filled in, or raises
:class:`~fastencdec.training.checks.ConfigError` naming the key (unknown keys get a
did-you-mean). Types and ranges are checked, files that must exist are looked for,
and sequence lengths are checked against the model's ``max_position_embeddings`` —
all before data is read or a model is built.

Data formats live in :data:`DATA_FORMATS` (name -> fields, default field names and
the tasks that read it) so that a new format is one entry here and one builder in
:mod:`.run_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .checks import ConfigError, check_value, unknown_keys_error
from .config import TASKS, TrainConfig

__all__ = ["validate_run", "apply_overrides", "DATA_FORMATS", "DataFormat", "SECTIONS",
           "TEACHER_DTYPES"]

SECTIONS = ("task", "output_dir", "tokenizer", "model", "teacher", "data", "training", "eval")
TEACHER_DTYPES = ("fp32", "bf16", "fp16")
ARCHITECTURES = ("encoder_decoder", "decoder_only")
# set from the tokenizer, never by hand
TOKENIZER_OWNED = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


@dataclass(frozen=True)
class DataFormat:
    fields: dict            # role -> default record field name
    tasks: tuple            # the tasks that read this format
    generates: bool         # whether held-out answers can be scored by generation


DATA_FORMATS = {
    "qa": DataFormat({"question": "question", "context": "context", "answer": "answer"},
                     ("finetune", "distill"), True),
    "seq2seq": DataFormat({"source": "source", "target": "target"},
                          ("finetune", "distill"), True),
    "text": DataFormat({"text": "text"}, ("pretrain",), False),
}

# key -> (kind, check options, default); a default of ... means required
TOKENIZER_TRAIN_KEYS = {
    "vocab_size": ("int", {"low": 8}, 8000),
    "num_sentinels": ("int", {"low": 0}, 100),
    "model_type": ("str", {"choices": ("unigram", "bpe", "char", "word")}, "unigram"),
    "character_coverage": ("float", {"low": 0.0, "low_open": True, "high": 1.0}, 1.0),
    "byte_fallback": ("bool", {}, False),
    "max_sentences": ("int", {"low": 1}, 2_000_000),
}
DATA_KEYS = {
    "train": ("strs", {}, ...),
    "valid": ("strs", {"optional": True}, None),
    "split": ("str", {}, "train"),
    "valid_split": ("str", {}, "validation"),
    "name": ("str", {"optional": True}, None),
    "format": ("str", {"choices": tuple(DATA_FORMATS), "optional": True}, None),
    "fields": ("mapping", {}, {}),
    "max_source_len": ("int", {"low": 1}, 512),
    "max_target_len": ("int", {"low": 1}, 64),
    "batch_size": ("int", {"low": 1}, 16),
    "chunk_length": ("int", {"low": 2}, 128),
    "noise_density": ("float", {"low": 0.0, "low_open": True, "high": 0.99}, 0.15),
    "mean_span_length": ("float", {"low": 1.0}, 3.0),
    "seed": ("int", {"low": 0}, 0),
}
EVAL_KEYS = {
    "max_examples": ("int", {"low": 1}, 500),
    "batch_size": ("int", {"low": 1}, 32),
    "max_new_tokens": ("int", {"low": 1, "optional": True}, None),
    "generate": ("bool", {"optional": True}, None),
}
TEACHER_KEYS = {
    "path": ("str", {"optional": True}, None),
    "hf": ("str", {"optional": True}, None),
    "dtype": ("str", {"choices": TEACHER_DTYPES}, "fp32"),
    "vocab": ("str", {}, "identical"),
}
MODEL_KEYS = {
    "path": ("str", {"optional": True}, None),
    "preset": ("str", {"optional": True}, None),
    "architecture": ("str", {"choices": ARCHITECTURES}, "encoder_decoder"),
    "overrides": ("mapping", {}, {}),
}
TOKENIZER_KEYS = {
    "path": ("str", {"optional": True}, None),
    "train": ("mapping", {"optional": True}, None),
    "special_tokens": ("mapping", {}, {}),
}


def _section(where: str, value, keys: dict) -> dict:
    value = check_value(where, {} if value is None else value, "mapping")
    unknown = set(value) - set(keys)
    if unknown:
        raise unknown_keys_error(where, unknown, keys)
    out = {}
    for key, (kind, options, default) in keys.items():
        if key not in value:
            if default is ...:
                raise ConfigError(f"{where}.{key} is required")
            out[key] = default
            continue
        out[key] = check_value(f"{where}.{key}", value[key], kind, **options)
    return out


def _hint(path: str) -> str:
    norm = path.replace(os.sep, "/")
    if "examples/data" in norm:
        return " (make it with: python examples/make_synthetic_qa.py)"
    return ""


def _must_exist(where: str, path: str, *, folder: bool = False) -> None:
    ok = os.path.isdir(path) if folder else os.path.exists(path)
    if not ok:
        raise ConfigError(f"{where}: {'folder' if folder else 'file'} {path} not found"
                          + _hint(path))


def _looks_local(path: str) -> bool:
    from ..data.sources import LOCAL_FORMATS

    return (os.path.splitext(path)[1].lower() in LOCAL_FORMATS or path.startswith((".", "/", "~"))
            or path.count("/") > 1)


def _model_config(model: dict):
    """The student's config (vocabulary fields are placeholders until the tokenizer
    is known), built without tensors: validates every override's type and range."""
    from ..models import DecoderOnlyConfig, EncDecConfig

    if model["path"] is not None:
        _must_exist("model.path", model["path"], folder=True)
        cfg_path = os.path.join(model["path"], "config.json")
        _must_exist("model.path", cfg_path)
        data = _read_json(cfg_path)
        arch = data.get("architecture", "encoder_decoder")
        cls = {"encoder_decoder": EncDecConfig, "decoder_only": DecoderOnlyConfig}.get(arch)
        if cls is None:
            raise ConfigError(f"{cfg_path}: unknown architecture {arch!r}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cfg_path}: {exc}") from None
    preset = model["preset"] or "tiny"
    try:
        config = EncDecConfig.preset(preset)
    except ValueError as exc:
        raise ConfigError(f"model.preset: {exc}") from None
    overrides = dict(model["overrides"])
    owned = sorted(set(overrides) & set(TOKENIZER_OWNED))
    if owned:
        raise ConfigError(f"model.overrides: {', '.join(owned)} come(s) from the tokenizer; "
                          "remove them")
    n_layers = overrides.pop("n_layers", None)
    if n_layers is not None and model["architecture"] != "decoder_only":
        raise ConfigError("model.overrides.n_layers is for architecture 'decoder_only'; an "
                          "encoder-decoder takes n_encoder_layers / n_decoder_layers")
    known = {f.name for f in dataclasses.fields(EncDecConfig)} - set(TOKENIZER_OWNED)
    if model["architecture"] == "decoder_only":
        known.add("n_layers")
    unknown = set(overrides) - known - {"n_layers"}
    if unknown:
        raise unknown_keys_error("model.overrides", unknown, known)
    placeholder_ids = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    try:
        config = dataclasses.replace(config, **overrides, **placeholder_ids)
        if model["architecture"] == "decoder_only":
            twin = DecoderOnlyConfig.twin_of(config)
            config = twin if n_layers is None else dataclasses.replace(twin, n_layers=n_layers)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None
    return config


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _check_lengths(config, data: dict, fmt: str) -> None:
    limit = config.max_position_embeddings
    if config.rope_scaling_factor > 1:
        return  # dynamic NTK scaling reaches past the trained length
    where = "model.overrides.max_position_embeddings"
    if fmt == "text":
        need, what = data["chunk_length"] + 1, f"data.chunk_length ({data['chunk_length']}) + 1"
    elif config.architecture == "decoder_only":
        need = data["max_source_len"] + data["max_target_len"]
        what = (f"data.max_source_len + data.max_target_len ({data['max_source_len']} + "
                f"{data['max_target_len']}, a decoder-only model reads both)")
    else:
        need = max(data["max_source_len"], data["max_target_len"])
        what = f"data.max_source_len ({data['max_source_len']})" \
            if data["max_source_len"] >= data["max_target_len"] \
            else f"data.max_target_len ({data['max_target_len']})"
    if need > limit:
        raise ConfigError(f"{what} exceeds the model's max_position_embeddings ({limit}): "
                          f"refused (generation would refuse such inputs later); lower the "
                          f"length or raise {where}")


def validate_run(run, source: str = "run config") -> dict:
    """The run with every section checked and defaults filled in (see module doc)."""
    if not isinstance(run, dict):
        raise ConfigError(f"{source} must hold a mapping of sections {', '.join(SECTIONS)}; "
                          f"got {type(run).__name__}")
    unknown = set(run) - set(SECTIONS)
    if unknown:
        raise unknown_keys_error(source, unknown, SECTIONS)
    out = {"task": check_value("task", run.get("task", "finetune"), "str", choices=TASKS)}
    task = out["task"]
    training = dict(check_value("training", run.get("training") or {}, "mapping"))
    if "task" in training and training["task"] != task:
        raise ConfigError(f"task is {task!r} but training.task is {training['task']!r}")
    out_dir = run.get("output_dir")
    if "out_dir" in training:
        if out_dir is not None and training["out_dir"] != out_dir:
            raise ConfigError("output_dir and training.out_dir differ: set output_dir only")
        out_dir = training["out_dir"]
    out["output_dir"] = check_value("output_dir", out_dir, "str")
    training.update(task=task, out_dir=out["output_dir"])
    try:
        TrainConfig.from_dict(training)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    out["training"] = training

    tokenizer = _section("tokenizer", run.get("tokenizer"), TOKENIZER_KEYS)
    if (tokenizer["path"] is None) == (tokenizer["train"] is None):
        raise ConfigError("tokenizer needs exactly one of 'path' (a .model or tokenizer.json "
                          "file) or 'train' (options)")
    if tokenizer["path"] is not None:
        _must_exist("tokenizer.path", tokenizer["path"])
    else:
        tokenizer["train"] = _section("tokenizer.train", tokenizer["train"],
                                      TOKENIZER_TRAIN_KEYS)
    out["tokenizer"] = tokenizer

    data = _section("data", run.get("data"), DATA_KEYS)
    fmt = data["format"] or ("text" if task == "pretrain" else "seq2seq")
    if task not in DATA_FORMATS[fmt].tasks:
        raise ConfigError(f"data.format {fmt!r} cannot feed task {task!r} (it feeds "
                          f"{', '.join(DATA_FORMATS[fmt].tasks)})")
    data["format"] = fmt
    fields = DATA_FORMATS[fmt].fields
    unknown = set(data["fields"]) - set(fields)
    if unknown:
        raise unknown_keys_error(f"data.fields (format {fmt})", unknown, fields)
    for key, value in data["fields"].items():
        check_value(f"data.fields.{key}", value, "str")
    data["fields"] = {**fields, **data["fields"]}
    for key in ("train", "valid"):
        paths = [data[key]] if isinstance(data[key], str) else (data[key] or [])
        for path in paths:
            if _looks_local(path):
                _must_exist(f"data.{key}", path)
    out["data"] = data

    model = _section("model", run.get("model"), MODEL_KEYS)
    if model["path"] is not None and (model["preset"] or model["overrides"]):
        raise ConfigError("model: give either 'path' (a saved model) or 'preset'/'overrides'")
    config = _model_config(model)
    _check_lengths(config, data, fmt)
    out["model"] = model

    if task == "distill":
        teacher = _section("teacher", run.get("teacher"), TEACHER_KEYS)
        if (teacher["path"] is None) == (teacher["hf"] is None):
            raise ConfigError("teacher needs exactly one of 'path' (a saved fastencdec model) "
                              "or 'hf' (a Hugging Face causal LM name or folder)")
        if teacher["path"] is not None and not os.path.isdir(teacher["path"]):
            raise ConfigError(f"teacher.path: folder {teacher['path']} not found (train the "
                              "teacher first, e.g. fastencdec train --config "
                              "examples/teacher_qa.yaml)")
        if teacher["vocab"] not in ("identical", "prefix"):
            _must_exist("teacher.vocab (a JSON mapping file)", teacher["vocab"])
        out["teacher"] = teacher
    elif run.get("teacher") is not None:
        raise ConfigError(f"teacher is only used by task 'distill' (task is {task!r})")
    else:
        out["teacher"] = None

    evaluation = _section("eval", run.get("eval"), EVAL_KEYS)
    if evaluation["generate"] is None:
        evaluation["generate"] = DATA_FORMATS[fmt].generates
    if evaluation["generate"] and not DATA_FORMATS[fmt].generates:
        raise ConfigError(f"eval.generate: data.format {fmt!r} has no answers to score")
    if evaluation["max_new_tokens"] is None:
        evaluation["max_new_tokens"] = data["max_target_len"]
    if run.get("eval") and data["valid"] is None:
        raise ConfigError("eval settings need held-out data: set data.valid")
    out["eval"] = evaluation
    return out


def apply_overrides(run: dict, assignments: list[str]) -> dict:
    """``--set section.key=value`` (value read as YAML: numbers, true/false, lists)."""
    import yaml

    run = json.loads(json.dumps(run))  # a deep copy of plain values
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        parts = key.strip().split(".")
        if parts[0] not in SECTIONS:
            raise unknown_keys_error(f"--set {item}", [parts[0]], SECTIONS)
        node = run
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[:depth + 1])} is not a "
                                  "section")
            node = child
        node[parts[-1]] = value
    return run
