"""The run file's schema: every key of every section checked before any work starts.

:func:`validate_run` returns the run with defaults filled in, or raises
:class:`~fastencdec.training.checks.ConfigError` naming the key (unknown keys get a
did-you-mean). Types and ranges are checked, files that must exist are looked for,
and sequence lengths are checked against the model's ``max_position_embeddings`` —
all before data is read or a model is built.

Data formats live in :data:`DATA_FORMATS` (name -> fields, default field names and
the tasks that read it) so that a new format is one entry here and one builder in
:mod:`.run_config`.

A ``model.vision`` section (:data:`VISION_KEYS`) makes the student a vision-language
model (``fastencdec.vision``): its tower, projector and any-resolution crops, with
the text model of ``preset``/``overrides`` or ``path`` as its language part. It goes
with ``data.format: image_text``; ``model.path`` may also name a saved
vision-language model (e.g. the output of a first stage).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .checks import ConfigError, check_value, did_you_mean, unknown_keys_error
from .config import TASKS, TrainConfig

__all__ = ["validate_run", "apply_overrides", "DATA_FORMATS", "DataFormat", "SECTIONS",
           "TEACHER_DTYPES", "VISION_KEYS", "model_config", "vision_configs", "is_vlm_config",
           "saved_model_config"]

SECTIONS = ("task", "output_dir", "tokenizer", "model", "teacher", "data", "training", "eval")
TEACHER_DTYPES = ("fp32", "bf16", "fp16")
ARCHITECTURES = ("encoder_decoder", "decoder_only")
VLM_ARCHITECTURES = ("vlm_encoder_decoder", "vlm_decoder_only")
ON_BAD_ROW = ("skip", "error")
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
    # {"image": path relative to the JSONL file, "source": prompt, "target": answer}
    "image_text": DataFormat({"image": "image", "source": "source", "target": "target"},
                             ("finetune", "distill"), True),
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
    # image_text only: a bad row (JSON, fields, image) is skipped and reported, or stops
    # the run before any step
    "on_bad_row": ("str", {"choices": ON_BAD_ROW}, "skip"),
}
IMAGE_TEXT_ONLY_DATA_KEYS = ("on_bad_row",)
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
    "vision": ("mapping", {"optional": True}, None),
}
# model.vision: the tower (a preset, sizes overriding it, or a local Hugging Face CLIP
# folder with its weights), the projector and the any-resolution crops
VISION_SIZE_KEYS = ("image_size", "patch_size", "width", "n_layers", "n_heads", "mlp_dim",
                    "activation", "norm_eps")
VISION_KEYS = {
    "preset": ("str", {"optional": True}, None),
    "hf": ("str", {"optional": True}, None),
    "image_size": ("int", {"low": 1, "optional": True}, None),
    "patch_size": ("int", {"low": 1, "optional": True}, None),
    "width": ("int", {"low": 1, "optional": True}, None),
    "n_layers": ("int", {"low": 1, "optional": True}, None),
    "n_heads": ("int", {"low": 1, "optional": True}, None),
    "mlp_dim": ("int", {"low": 1, "optional": True}, None),
    "feature_layer": ("int", {"optional": True}, None),
    "activation": ("str", {"optional": True}, None),
    "norm_eps": ("float", {"low": 0.0, "low_open": True, "optional": True}, None),
    # a check: a tower gives (image_size / patch_size)^2 tokens per crop
    "tokens_per_crop": ("int", {"low": 1, "optional": True}, None),
    "projector": ("str", {"choices": ("mlp2x_gelu",)}, "mlp2x_gelu"),
    "grid": ("grid", {}, None),            # any-res grids in crops [[w, h], ...]
    "variance_k": ("int", {"low": 0, "optional": True}, None),
    "max_crops": ("int", {"low": 1, "optional": True}, None),
    "mean": ("rgb", {}, None),
    "std": ("rgb", {"positive": True}, None),
}
TOKENIZER_KEYS = {
    "path": ("str", {"optional": True}, None),
    "train": ("mapping", {"optional": True}, None),
    "special_tokens": ("mapping", {}, {}),
}


def _grid(where: str, value) -> list[list[int]] | None:
    """A list of ``[width, height]`` grids in crops (positive ints)."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(g, (list, tuple)) and len(g) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in g)
        for g in value)
    if not ok:
        raise ConfigError(f"{where} must be a non-empty list of [width, height] grids in crops "
                          f"(positive integers), e.g. [[1, 1], [2, 2], [3, 2]]; got {value!r}")
    return [list(g) for g in value]


def _rgb(where: str, value, positive: bool = False) -> list[float] | None:
    """Three finite numbers (R, G, B); > 0 with ``positive``."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{where} must be a list of 3 numbers (R, G, B), got {value!r}")
    return [check_value(f"{where}[{i}]", v, "float", low=0.0 if positive else None,
                        low_open=positive) for i, v in enumerate(value)]


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
        if kind == "grid":
            out[key] = _grid(f"{where}.{key}", value[key])
        elif kind == "rgb":
            out[key] = _rgb(f"{where}.{key}", value[key], **options)
        else:
            out[key] = check_value(f"{where}.{key}", value[key], kind, **options)
    return out


def _hint(path: str) -> str:
    norm = path.replace(os.sep, "/")
    if "examples/data/vqa" in norm:
        return " (make it with: python examples/make_synthetic_images.py)"
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


def is_vlm_config(config) -> bool:
    """Whether ``config`` is a vision-language model's (a ``VLMConfig``)."""
    return hasattr(config, "vision") and hasattr(config, "anyres")


def saved_model_config(where: str, folder: str):
    """The config of the model saved in ``folder`` (a text model or a vision-language
    model), read without tensors; errors name ``where`` and the file."""
    from ..models import DecoderOnlyConfig, EncDecConfig

    _must_exist(where, folder, folder=True)
    cfg_path = os.path.join(folder, "config.json")
    _must_exist(where, cfg_path)
    data = _read_json(cfg_path)
    arch = data.get("architecture", "encoder_decoder")
    try:
        if arch in VLM_ARCHITECTURES:
            from ..vision.config import VLMConfig

            return VLMConfig.from_dict(data)
        cls = {"encoder_decoder": EncDecConfig, "decoder_only": DecoderOnlyConfig}.get(arch)
        if cls is None:
            raise ConfigError(f"{cfg_path}: unknown architecture {arch!r}")
        return cls.from_dict(data)
    except ConfigError:
        raise
    except KeyError as exc:
        raise ConfigError(f"{cfg_path}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None


def vision_configs(vision: dict):
    """``(VisionConfig, AnyResConfig)`` of a checked ``model.vision`` section."""
    from ..vision.anyres import DEFAULT_GRID, AnyResConfig
    from ..vision.tower import VisionConfig

    where = "model.vision"
    sizes = {k: vision[k] for k in VISION_SIZE_KEYS if vision.get(k) is not None}
    try:
        if vision.get("hf") is not None:
            from ..vision.hf_clip import vision_config_from_hf

            cfg_path = os.path.join(vision["hf"], "config.json")
            tower = vision_config_from_hf(_read_json(cfg_path))
        else:
            tower = VisionConfig.preset(vision.get("preset") or "tiny")
        if vision.get("feature_layer") is not None:
            sizes["feature_layer"] = vision["feature_layer"]
        tower = tower.replace(**sizes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    wanted = vision.get("tokens_per_crop")
    if wanted is not None and wanted != tower.tokens_per_crop:
        raise ConfigError(f"{where}.tokens_per_crop: the tower gives (image_size / patch_size)^2 "
                          f"= ({tower.image_size} / {tower.patch_size})^2 = "
                          f"{tower.tokens_per_crop} tokens per crop, not {wanted}; change "
                          "patch_size or image_size (or drop tokens_per_crop)")
    crop = tower.image_size
    grid = vision.get("grid") or [list(g) for g in DEFAULT_GRID]
    extra = {k: tuple(vision[k]) for k in ("mean", "std") if vision.get(k) is not None}
    try:
        anyres = AnyResConfig(crop_size=crop, pinpoints=tuple((w * crop, h * crop)
                                                              for w, h in grid),
                              variance_k=vision.get("variance_k"),
                              max_crops=vision.get("max_crops"), **extra)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return tower, anyres


def _vision_section(value) -> dict:
    from ..vision.tower import ACTIVATIONS, VISION_PRESETS

    vision = _section("model.vision", value, VISION_KEYS)
    if vision["preset"] is not None and vision["preset"] not in VISION_PRESETS:
        raise ConfigError(f"model.vision.preset: unknown preset {vision['preset']!r}; choose one "
                          f"of {', '.join(sorted(VISION_PRESETS))}"
                          f"{did_you_mean(vision['preset'], VISION_PRESETS)}")
    if vision["activation"] is not None and vision["activation"] not in ACTIVATIONS:
        raise ConfigError(f"model.vision.activation must be one of {', '.join(ACTIVATIONS)}; "
                          f"got {vision['activation']!r}")
    if vision["hf"] is not None:
        given = [k for k in ("preset", *VISION_SIZE_KEYS) if vision[k] is not None]
        if given:
            raise ConfigError(f"model.vision: 'hf' ({vision['hf']}) gives the tower's sizes and "
                              f"weights; remove {', '.join(given)} (feature_layer may be set)")
        _must_exist("model.vision.hf", vision["hf"], folder=True)
        _must_exist("model.vision.hf", os.path.join(vision["hf"], "config.json"))
    return vision


def model_config(model: dict):
    """The student's config from a checked ``model`` section: a text model's, or a
    ``VLMConfig`` (``model.vision``, or a saved vision-language model in ``path``).
    Vocabulary fields are placeholders until the tokenizer is known; built without
    tensors, so every override's type and range is checked."""
    if model["path"] is not None:
        config = saved_model_config("model.path", model["path"])
        if is_vlm_config(config):
            if model.get("vision") is not None:
                raise ConfigError(f"model.vision: model.path {model['path']} is a saved "
                                  "vision-language model, which keeps its own vision settings; "
                                  "remove model.vision (or point model.path at a text model)")
            return config
    else:
        config = _text_config(model)
    if model.get("vision") is None:
        return config
    from ..vision.config import VLMConfig

    tower, anyres = vision_configs(model["vision"])
    try:
        return VLMConfig(text=config, vision=tower, anyres=anyres)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.vision: {exc}") from None


def _text_config(model: dict):
    from ..models import DecoderOnlyConfig, EncDecConfig

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
    if is_vlm_config(config):
        _check_vlm_lengths(config, data, limit, where)
        return
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


def _check_vlm_lengths(config, data: dict, limit: int, where: str) -> None:
    """The image tokens come first (positions 0 ..), then the prompt; a decoder-only
    model reads the answer after them."""
    images = config.max_image_tokens
    image_text = (f"{images} image tokens ({config.max_crops} crops x "
                  f"{config.vision.tokens_per_crop} tokens per crop)")
    if config.text.architecture == "decoder_only":
        need = images + data["max_source_len"] + data["max_target_len"]
        what = (f"{image_text} + data.max_source_len + data.max_target_len "
                f"({data['max_source_len']} + {data['max_target_len']})")
    else:
        need = images + data["max_source_len"]
        what = f"{image_text} + data.max_source_len ({data['max_source_len']})"
        if data["max_target_len"] > need:
            need, what = data["max_target_len"], f"data.max_target_len ({data['max_target_len']})"
    if need > limit:
        raise ConfigError(f"{what} = {need} exceed(s) the model's max_position_embeddings "
                          f"({limit}): refused; lower the lengths, set model.vision.variance_k "
                          f"or max_crops, or raise {where}")


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
        train_config = TrainConfig.from_dict(training)
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

    raw_data = run.get("data")
    data = _section("data", raw_data, DATA_KEYS)
    fmt = data["format"] or ("text" if task == "pretrain" else "seq2seq")
    if fmt != "image_text":
        given = [k for k in IMAGE_TEXT_ONLY_DATA_KEYS if k in raw_data]
        if given:
            raise ConfigError(f"data.{given[0]} is for data.format 'image_text' (format is "
                              f"{fmt!r})")
        for key in IMAGE_TEXT_ONLY_DATA_KEYS:
            data.pop(key)
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
            if fmt == "image_text":  # local JSONL files only (image paths are relative to them)
                _must_exist(f"data.{key}", path)
                if os.path.isdir(path):
                    raise ConfigError(f"data.{key}: format image_text reads JSONL files; {path} "
                                      "is a folder")
            elif _looks_local(path):
                _must_exist(f"data.{key}", path)
    out["data"] = data

    model = _section("model", run.get("model"), MODEL_KEYS)
    if model["path"] is not None and (model["preset"] or model["overrides"]):
        raise ConfigError("model: give either 'path' (a saved model) or 'preset'/'overrides'")
    if model["vision"] is not None:
        model["vision"] = _vision_section(model["vision"])
    config = model_config(model)
    vlm = is_vlm_config(config)
    if fmt == "image_text" and not vlm:
        raise ConfigError("data.format 'image_text' needs a vision-language model: add a "
                          "model.vision section (e.g. {preset: tiny}) or set model.path to a "
                          "saved one")
    if vlm and fmt != "image_text":
        what = "model.vision" if model["vision"] is not None else f"model.path {model['path']}"
        raise ConfigError(f"{what}: a vision-language model trains on data.format 'image_text' "
                          f"(format is {fmt!r})")
    if train_config.uses_vision_options and not vlm:
        key = (f"freeze_{train_config.frozen_parts[0]}" if train_config.frozen_parts
               else "lr_multipliers")
        raise ConfigError(f"training.{key} is for vision-language models (vision, projector, "
                          "lm): add a model.vision section")
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
        _check_teacher_images(teacher, config, fmt)
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


def _check_teacher_images(teacher: dict, student, fmt: str) -> None:
    """Image-text distillation: the teacher is a saved fastencdec vision-language model
    that reads the student's crops (the same any-res settings) and image slots (the
    same tokens per crop); a text run takes no vision-language teacher."""
    if fmt != "image_text":
        if teacher["path"] is not None and os.path.isfile(
                os.path.join(teacher["path"], "config.json")):
            if is_vlm_config(saved_model_config("teacher.path", teacher["path"])):
                raise ConfigError(f"teacher.path {teacher['path']} is a vision-language model: "
                                  "it distils on data.format 'image_text'")
        return
    if teacher["hf"] is not None:
        raise ConfigError("teacher.hf: image-text distillation needs a fastencdec "
                          "vision-language teacher (teacher.path, a folder saved by "
                          "fastencdec train or save_pretrained)")
    t = saved_model_config("teacher.path", teacher["path"])
    if not is_vlm_config(t):
        raise ConfigError(f"teacher.path {teacher['path']} is a text model: image-text "
                          "distillation needs a vision-language teacher (it must see the "
                          "images)")
    mine, theirs = student.anyres.to_dict(), t.anyres.to_dict()
    mine.pop("max_crops"), theirs.pop("max_crops")
    if mine != theirs:
        differ = "; ".join(f"{k}: teacher {theirs[k]}, student {mine[k]}"
                           for k in sorted(mine) if mine[k] != theirs[k])
        raise ConfigError(f"teacher.path {teacher['path']}: the teacher cuts images differently "
                          f"({differ}); student and teacher read the same crops, so "
                          "model.vision must match the teacher's any-res settings")
    if t.max_crops < student.max_crops:
        raise ConfigError(f"teacher.path {teacher['path']}: the teacher reads at most "
                          f"{t.max_crops} crops per image, the student up to {student.max_crops}; "
                          "lower model.vision.max_crops or variance_k")
    if t.vision.tokens_per_crop != student.vision.tokens_per_crop:
        raise ConfigError(f"teacher.path {teacher['path']}: the teacher's tower gives "
                          f"{t.vision.tokens_per_crop} tokens per crop, the student's "
                          f"{student.vision.tokens_per_crop} (image_size / patch_size squared); "
                          "they must match (both read the same image slots)")


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
