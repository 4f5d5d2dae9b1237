"""``fastencdec train --config run.yaml``: build tokenizer, data, model(s) and train.

A run file (YAML or JSON) has these sections (see ``examples/``)::

    task: finetune | pretrain | distill
    output_dir: runs/my-run
    tokenizer: {path: tok.model}  or  {train: {vocab_size: 8000, num_sentinels: 100}}
    model: {preset: tiny, overrides: {...}}  or  {path: saved-model-dir}
           (architecture: encoder_decoder | decoder_only; default encoder_decoder)
    teacher: {path: saved-decoder-only-dir}  or  {hf: name-or-path}   (distill)
    data: {train: file(s) or hub name, format: qa | seq2seq | text, fields: {...},
           max_source_len: 512, max_target_len: 64, batch_size: 16, chunk_length: 128}
    training: {any TrainConfig field}

Every section is validated with errors naming the offending key.
"""

from __future__ import annotations

import json
import os

import torch

from ..data import (
    BatchStream,
    LengthBucketBatchSampler,
    Seq2SeqCollator,
    Seq2SeqEncoder,
    SpanCorruptionCollator,
    Tokenizer,
    chunk_tokens,
    example_length,
    load_records,
    qa_to_seq2seq,
    to_seq2seq,
)
from .config import TrainConfig
from .distributed import init_distributed

__all__ = ["load_run_file", "run_training", "load_pretrained", "load_teacher"]

SECTIONS = ("task", "output_dir", "tokenizer", "model", "teacher", "data", "training")


def load_run_file(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run config not found: {path}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ImportError("YAML run files need PyYAML: pip install pyyaml "
                              "(or write the config as JSON)") from exc
        run = yaml.safe_load(text)
    elif path.endswith(".json"):
        run = json.loads(text)
    else:
        raise ValueError(f"run config must end with .yaml, .yml or .json, got {path}")
    if not isinstance(run, dict):
        raise ValueError(f"{path} must hold a mapping of sections {SECTIONS}")
    unknown = sorted(set(run) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; known: {list(SECTIONS)}")
    return run


def _section(run: dict, name: str, required: bool = True) -> dict:
    value = run.get(name)
    if value is None:
        if required:
            raise ValueError(f"run config needs a '{name}' section")
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"run config section '{name}' must be a mapping, got {value!r}")
    return value


def load_pretrained(directory: str | os.PathLike, device=None):
    """An ``EncoderDecoderLM`` or ``DecoderOnlyLM`` saved with ``save_pretrained``."""
    from ..models import DecoderOnlyLM, EncoderDecoderLM

    cfg_path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory} holds no config.json (not a saved model)")
    with open(cfg_path, encoding="utf-8") as fh:
        arch = json.load(fh).get("architecture", "encoder_decoder")
    classes = {"encoder_decoder": EncoderDecoderLM, "decoder_only": DecoderOnlyLM}
    if arch not in classes:
        raise ValueError(f"{cfg_path}: unknown architecture {arch!r}")
    model = classes[arch].from_pretrained(directory, device=device)
    return model


def load_teacher(spec: dict, device=None):
    """``{path: dir}`` (a fastencdec model) or ``{hf: name}`` (transformers causal LM)."""
    if "path" in spec:
        return load_pretrained(spec["path"], device=device)
    if "hf" in spec:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise ImportError("teacher.hf needs the 'transformers' package: "
                              "pip install transformers") from exc
        return AutoModelForCausalLM.from_pretrained(spec["hf"]).to(device or "cpu")
    raise ValueError("teacher section needs 'path' (a saved fastencdec model) or 'hf' "
                     "(a Hugging Face causal LM name or folder)")


def _tokenizer(spec: dict, texts_for_training) -> Tokenizer:
    if "path" in spec:
        return Tokenizer.load(spec["path"])
    if "train" in spec:
        options = dict(spec["train"] or {})
        return Tokenizer.train(texts_for_training(), **options)
    raise ValueError("tokenizer section needs 'path' (a .model file) or 'train' (options)")


def _build_model(spec: dict, tok: Tokenizer):
    from ..models import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM

    if "path" in spec:
        return load_pretrained(spec["path"]).train()
    arch = spec.get("architecture", "encoder_decoder")
    if arch not in ("encoder_decoder", "decoder_only"):
        raise ValueError(f"model.architecture must be 'encoder_decoder' or 'decoder_only', "
                         f"got {arch!r}")
    overrides = dict(spec.get("overrides") or {})
    n_layers = overrides.pop("n_layers", None)  # decoder-only: set directly, else sized
    if n_layers is not None and arch != "decoder_only":
        raise ValueError("model.overrides.n_layers is for architecture 'decoder_only'; an "
                         "encoder-decoder takes n_encoder_layers / n_decoder_layers")
    config = EncDecConfig.preset(spec.get("preset", "tiny"))
    ids = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
               eos_token_id=tok.eos_id)
    config = config.replace(**{**ids, **overrides})
    if arch == "decoder_only":
        twin = DecoderOnlyConfig.twin_of(config)
        return DecoderOnlyLM(twin if n_layers is None else twin.replace(n_layers=n_layers))
    return EncoderDecoderLM(config)


def _examples(data: dict, task: str, tok: Tokenizer, records) -> tuple[list[dict], object]:
    fmt = data.get("format", "text" if task == "pretrain" else "seq2seq")
    fields = data.get("fields") or {}
    if task == "pretrain":
        if fmt != "text":
            raise ValueError("task 'pretrain' reads raw text: data.format must be 'text'")
        field = fields.get("text", "text")
        chunks = chunk_tokens((tok.encode(r[field]) for r in records),
                              int(data.get("chunk_length", 128)), separator=tok.eos_id)
        if not chunks:
            raise ValueError("the pretraining text is shorter than one chunk_length")
        collate = SpanCorruptionCollator.for_tokenizer(
            tok, noise_density=float(data.get("noise_density", 0.15)),
            mean_span_length=float(data.get("mean_span_length", 3.0)),
            seed=int(data.get("seed", 0)))
        return chunks, collate
    if fmt == "qa":
        pairs = qa_to_seq2seq(records, **{f"{k}_field": v for k, v in fields.items()})
    elif fmt == "seq2seq":
        pairs = to_seq2seq(records, **{f"{k}_field": v for k, v in fields.items()})
    else:
        raise ValueError(f"data.format must be 'qa' or 'seq2seq' for task {task!r}, got {fmt!r}")
    encoder = Seq2SeqEncoder(tok, max_source_len=int(data.get("max_source_len", 512)),
                             max_target_len=int(data.get("max_target_len", 64)))
    return encoder.encode_all(pairs), Seq2SeqCollator.for_tokenizer(tok)


def run_training(run: dict, *, resume: str | None = None, device: str | None = None) -> str:
    """Train as the run config says; returns the folder of the saved model."""
    from .trainer import Trainer

    task = run.get("task", "finetune")
    training = dict(_section(run, "training", required=False))
    training.setdefault("task", task)
    if training["task"] != task:
        raise ValueError(f"task is {task!r} but training.task is {training['task']!r}")
    out_dir = run.get("output_dir") or training.get("out_dir")
    if not out_dir:
        raise ValueError("run config needs output_dir")
    training["out_dir"] = out_dir
    config = TrainConfig.from_dict(training)
    info = init_distributed(device)

    data = _section(run, "data")
    if "train" not in data:
        raise ValueError("data section needs 'train' (files or a dataset name)")
    records = load_records(data["train"], split=data.get("split", "train"))

    def corpus():
        for r in records:
            yield " ".join(str(v) for v in r.values() if isinstance(v, str))

    tok = _tokenizer(_section(run, "tokenizer"), corpus)
    examples, collate = _examples(data, task, tok, records)
    sampler = LengthBucketBatchSampler([example_length(e) if "labels" in e
                                        else len(e["input_ids"]) for e in examples],
                                       int(data.get("batch_size", 16)), seed=config.seed)
    stream = BatchStream(examples, sampler, collate, rank=info.rank, world_size=info.world_size)
    torch.manual_seed(config.seed)
    model = _build_model(_section(run, "model"), tok)
    teacher = load_teacher(_section(run, "teacher"), info.device) if task == "distill" else None
    trainer = Trainer(model, config, stream, teacher=teacher, dist_info=info)
    trainer.train(resume=resume)
    model_dir = os.path.join(out_dir, "model")
    trainer.save_model(model_dir)
    if info.is_main:
        tok.save(os.path.join(model_dir, "tokenizer.model"))
    trainer.close()
    return model_dir
