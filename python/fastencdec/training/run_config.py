"""``fastencdec train --config run.yaml``: build tokenizer, data, model(s) and train.

A run file (YAML or JSON) has these sections (see ``examples/``)::

    task: finetune | pretrain | distill
    output_dir: runs/my-run
    tokenizer: {path: tok.model | tokenizer.json}  or  {train: {vocab_size: 8000, ...}}
    model: {preset: tiny, architecture: encoder_decoder | decoder_only, overrides: {...}}
           or {path: saved-model-dir}
    teacher: {path: saved-dir} or {hf: name-or-path}; dtype: fp32|bf16|fp16;
             vocab: identical (checked) | prefix | mapping.json          (distill)
    data: {train: file(s) or hub name, valid: file(s),
           format: qa | seq2seq | text | image_text, fields: {...}, max_source_len: 512,
           max_target_len: 64, batch_size: 16, chunk_length: 128, noise_density: 0.15,
           mean_span_length: 3.0, on_bad_row: skip | error (image_text)}
    training: {any TrainConfig field}
    eval: {max_examples: 500, batch_size: 32, max_new_tokens: ..., generate: true}

Images: ``model.vision: {preset: tiny, grid: [[1, 1], [2, 2]], variance_k: 2, ...}``
makes the student a vision-language model (``fastencdec.vision``) trained on
``format: image_text`` JSONL rows ``{"image": path relative to the file, "source",
"target"}``; ``training.freeze_vision`` / ``freeze_projector`` / ``freeze_lm`` and
``training.lr_multipliers: {vision: 0.1}`` give the two stages, and a distillation
teacher may be a saved vision-language model (it reads the same crops). The saved
model loads with ``fastencdec.vision.load_vlm`` (``fastencdec generate --image``).

Every key of every section is validated (:mod:`.run_schema`) before any data is
read or model built. The data is read lazily: each process tokenises only the
batches it takes.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from ..data import (
    BatchStream,
    LengthBucketBatchSampler,
    MappedSequence,
    Seq2SeqCollator,
    Seq2SeqEncoder,
    SpanCorruptionCollator,
    TextBlocks,
    Tokenizer,
    approx_lengths,
    load_records,
    load_tokenizer,
    qa_record,
    seq2seq_record,
    span_corrupt,
)
from .checks import ConfigError
from .config import TrainConfig
from .distributed import barrier, init_distributed
from .interrupt import TrainingInterrupted
from .run_dir import prepare_output_dir
from .run_schema import SECTIONS, is_vlm_config, model_config, validate_run
from .threads import choose_threads, warn_if_oversubscribed

__all__ = ["load_run_file", "run_training", "load_pretrained", "load_teacher", "DATA_BUILDERS",
           "build_evaluator"]

TEACHER_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_run_file(path: str | os.PathLike) -> dict:
    """Read a YAML/JSON run file; errors name the file (the schema is checked by
    :func:`~fastencdec.training.run_schema.validate_run`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run config not found: {path}")
    if not path.endswith((".yaml", ".yml", ".json")):
        raise ConfigError(f"run config must end with .yaml, .yml or .json, got {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    if path.endswith(".json"):
        try:
            run = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            run = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(run, dict):
        raise ConfigError(f"{path} must hold a mapping of sections {', '.join(SECTIONS)}")
    unknown = set(run) - set(SECTIONS)
    if unknown:
        from .checks import unknown_keys_error

        raise unknown_keys_error(path, unknown, SECTIONS)
    return run


def load_pretrained(directory: str | os.PathLike, device=None, dtype=None):
    """An ``EncoderDecoderLM`` or ``DecoderOnlyLM`` saved with ``save_pretrained``."""
    from ..models import DecoderOnlyLM, EncoderDecoderLM

    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model folder not found: {directory}")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory} holds no config.json (not a saved model)")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except ValueError as exc:
        raise ConfigError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_path} must hold a JSON object")
    arch = data.get("architecture", "encoder_decoder")
    classes = {"encoder_decoder": EncoderDecoderLM, "decoder_only": DecoderOnlyLM}
    from .run_schema import VLM_ARCHITECTURES

    if arch in VLM_ARCHITECTURES:
        raise ConfigError(f"{directory} holds a vision-language model ({arch}): give it an "
                          "image (fastencdec generate --image PATH), or load it with "
                          "fastencdec.vision.load_vlm")
    if arch not in classes:
        raise ConfigError(f"{cfg_path}: unknown architecture {arch!r}")
    return classes[arch].from_pretrained(directory, device=device, dtype=dtype)


def _is_saved_vlm(directory: str) -> bool:
    from .run_schema import VLM_ARCHITECTURES

    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        return False
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except ValueError as exc:
        raise ConfigError(f"{cfg_path} is not valid JSON ({exc})") from None
    return isinstance(data, dict) and data.get("architecture") in VLM_ARCHITECTURES


def load_model_dir(directory: str | os.PathLike, device=None, dtype=None):
    """A saved text model (:func:`load_pretrained`) or vision-language model
    (``fastencdec.vision.load_vlm``), whichever ``directory`` holds."""
    directory = os.fspath(directory)
    if _is_saved_vlm(directory):
        from ..vision.models import load_vlm

        return load_vlm(directory, device=device, dtype=dtype)
    return load_pretrained(directory, device=device, dtype=dtype)


def load_teacher(spec: dict, device=None):
    """``{path: dir}`` (a fastencdec model, a vision-language one included) or
    ``{hf: name}`` (transformers causal LM), in ``spec["dtype"]`` (default fp32)."""
    dtype = TEACHER_TORCH_DTYPES[spec.get("dtype") or "fp32"]
    if spec.get("path"):
        return load_model_dir(spec["path"], device=device, dtype=dtype)
    if spec.get("hf"):
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise ImportError("teacher.hf needs the 'transformers' package: "
                              "pip install transformers") from exc
        model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=dtype)
        return model.to(device or "cpu")
    raise ConfigError("teacher section needs 'path' (a saved fastencdec model) or 'hf' "
                      "(a Hugging Face causal LM name or folder)")


# ---------------------------------------------------------------------- tokenizer
def _run_tokenizer(run: dict, records, out_dir: str, is_main: bool, resuming: bool):
    """The run's tokenizer: loaded, or trained once and kept in ``out_dir`` (a resumed
    run loads the kept one, so its ids cannot change)."""
    spec = run["tokenizer"]
    if spec["path"] is not None:
        return load_tokenizer(spec["path"], special_tokens=spec["special_tokens"] or None)
    kept = os.path.join(out_dir, "tokenizer.model")
    if resuming and os.path.isfile(kept):
        return Tokenizer.load(kept)
    options = dict(spec["train"])

    def corpus():
        for r in records:
            yield " ".join(str(v) for v in r.values() if isinstance(v, str))

    tok = Tokenizer.train(corpus(), **options)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        tok.save(kept)
    return tok


def _teacher_vocab_map(spec: dict, tok):
    """None when the teacher's ids mean the student's tokens (checked), else the
    ``[V_student]`` teacher ids from the mapping file."""
    mode = spec["vocab"]
    if mode == "prefix":
        return None
    if mode != "identical":
        return _read_vocab_map(mode, tok.vocab_size)
    student = tok.pieces()
    if spec.get("path"):
        try:
            teacher_pieces = load_tokenizer(spec["path"]).pieces()
        except FileNotFoundError:
            raise ConfigError(f"teacher.path {spec['path']} holds no tokenizer: cannot check "
                              "that it shares the student's; set teacher.vocab: prefix to "
                              "distil over the shared ids anyway") from None
    else:
        try:
            from transformers import AutoTokenizer

            hf_tok = AutoTokenizer.from_pretrained(spec["hf"])
        except Exception as exc:  # missing files, offline, unknown class
            raise ConfigError(f"cannot load the tokenizer of teacher.hf {spec['hf']!r} to check "
                              f"that it equals the student's ({type(exc).__name__}); set "
                              "teacher.vocab: prefix to distil over the shared ids anyway, or "
                              "give a mapping file") from None
        teacher_pieces = hf_tok.convert_ids_to_tokens(list(range(len(hf_tok))))
    differ = [i for i, p in enumerate(student)
              if i >= len(teacher_pieces) or teacher_pieces[i] != p]
    if differ:
        i = differ[0]
        theirs = teacher_pieces[i] if i < len(teacher_pieces) else "(none)"
        raise ConfigError(
            f"the teacher's tokenizer differs from the student's ({len(differ)} of "
            f"{len(student)} ids, e.g. id {i}: student {student[i]!r}, teacher {theirs!r}): "
            "distillation compares the two distributions id by id, so it is refused; use the "
            "teacher's tokenizer for the student (tokenizer.path), give teacher.vocab: a JSON "
            "file mapping student ids to teacher ids, or teacher.vocab: prefix to accept the "
            "shared id prefix as it is")
    return None


def _read_vocab_map(path: str, student_vocab: int) -> torch.Tensor:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except ValueError as exc:
        raise ConfigError(f"teacher.vocab {path} is not valid JSON ({exc})") from None
    if isinstance(data, dict):
        try:
            data = [data[str(i)] for i in range(student_vocab)]
        except KeyError as exc:
            raise ConfigError(f"teacher.vocab {path} has no teacher id for student id "
                              f"{exc.args[0]}") from None
    if (not isinstance(data, list) or len(data) != student_vocab
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data)):
        raise ConfigError(f"teacher.vocab {path} must list {student_vocab} teacher ids (ints "
                          ">= 0), one per student id, or map each student id to one")
    return torch.tensor(data, dtype=torch.long)


# ---------------------------------------------------------------------- data formats
def _pair_builder(to_example):
    def build(records, tok, data: dict, model_config=None):
        fields = data["fields"]
        encoder = Seq2SeqEncoder(tok, max_source_len=data["max_source_len"],
                                 max_target_len=data["max_target_len"])
        examples = MappedSequence(records, lambda r: encoder(to_example(r, fields)))
        return examples, approx_lengths(records), Seq2SeqCollator.for_tokenizer(tok)

    return build


def _qa(record, fields):
    return qa_record(record, question_field=fields["question"], context_field=fields["context"],
                     answer_field=fields["answer"])


def _seq2seq(record, fields):
    return seq2seq_record(record, source_field=fields["source"], target_field=fields["target"])


def _text(records, tok, data: dict, model_config=None):
    blocks = TextBlocks(records, tok, data["chunk_length"], field=data["fields"]["text"],
                        separator=tok.eos_id)
    collate = SpanCorruptionCollator.for_tokenizer(
        tok, noise_density=data["noise_density"], mean_span_length=data["mean_span_length"],
        seed=data["seed"])
    return blocks, blocks.lengths(), collate


def _image_text(records, tok, data: dict, model_config=None):
    """Checked image-text records (:func:`read_image_text_records`: crops decoded, bad
    rows already left out) -> examples with their crops; the collator puts one image
    slot per image token at the front of each prompt (the model's tokens per crop)."""
    from ..vision.data import ImageTextCollator, encode_image_text

    if model_config is None or not is_vlm_config(model_config):
        raise ConfigError("data.format 'image_text' needs a vision-language model "
                          "(model.vision)")
    encoder = Seq2SeqEncoder(tok, max_source_len=data["max_source_len"],
                             max_target_len=data["max_target_len"])
    examples = encode_image_text(records, encoder)
    per_crop = model_config.vision.tokens_per_crop
    lengths = [len(ex["input_ids"]) + per_crop * len(ex["image_crops"]) for ex in examples]
    collate = ImageTextCollator.for_tokenizer(tok, model_config.anyres,
                                              tokens_per_crop=per_crop)
    return examples, lengths, collate


# format -> builder(records, tokenizer, data section, model config) -> (examples, lengths,
# collate); a pair format also names how a record gives its answer (generation metrics)
DATA_BUILDERS = {"qa": _pair_builder(_qa), "seq2seq": _pair_builder(_seq2seq), "text": _text,
                 "image_text": _image_text}
ANSWERS = {"qa": lambda r, f: _qa(r, f)["target"], "seq2seq": lambda r, f: _seq2seq(r, f)["target"],
           "image_text": lambda r, f: r["target"]}


def read_image_text_records(paths, data: dict, anyres, *, where: str,
                            report: str | None = None, announce: bool = True) -> list[dict]:
    """Every row of the image-text JSONL file(s) ``paths`` checked now, its image
    decoded and cut into crops (``fastencdec.vision.data.check_image_text_rows``), so
    that no bad row can stop a run mid-epoch. Bad rows are listed by file and row
    number: with ``data.on_bad_row: skip`` they are left out (a warning counts them
    when ``announce``, and ``report``, a file, lists them all), with ``error`` the run
    stops before any step."""
    from ..vision.data import bad_rows_listing, check_image_text_rows

    got = check_image_text_rows(paths, anyres, fields=data["fields"])
    bad = got.bad
    if bad:
        listing = bad_rows_listing(bad)
        if data["on_bad_row"] == "error":
            raise ConfigError(f"{where}: {len(bad)} bad image-text row(s), nothing trained "
                              f"(data.on_bad_row: error): {listing}")
        if report is not None:
            os.makedirs(os.path.dirname(report) or ".", exist_ok=True)
            with open(report, "a", encoding="utf-8") as fh:
                fh.writelines(f"{b}\n" for b in bad)
        where_all = f"; all listed in {report}" if report is not None else ""
        if announce:
            warnings.warn(f"{where}: skipped {len(bad)} bad image-text row(s) "
                          f"(data.on_bad_row: skip{where_all}): {listing}", stacklevel=2)
    if not got.records:
        raise ConfigError(f"{where}: no usable image-text rows in {paths}")
    return got.records


def _text_fields(records, fmt: str):
    """What the tokenizer trains on: every string field, or an image-text row's prompt
    and answer (not its image path)."""
    if fmt == "image_text":
        return [{"source": r["source"], "target": r["target"]} for r in records]
    return records


def build_evaluator(records, tok, data: dict, evaluation: dict, model_config=None):
    """A fixed held-out set (the first ``eval.max_examples`` records)."""
    from .evaluation import Evaluator

    fmt = data["format"]
    subset = [records[i] for i in range(min(len(records), evaluation["max_examples"]))]
    if not subset:
        raise ConfigError("data.valid holds no records")
    examples, _, collate = DATA_BUILDERS[fmt](subset, tok, data, model_config)
    examples = list(examples)
    if fmt == "text":  # corrupt once, with a fixed seed: the same held-out batch every time
        rng = np.random.default_rng(data["seed"])
        pairs = [span_corrupt(e["input_ids"], tok.sentinel_ids, tok.eos_id, rng,
                              noise_density=data["noise_density"],
                              mean_span_length=data["mean_span_length"]) for e in examples]
        examples = [{"input_ids": x, "labels": y} for x, y in pairs]
        collate = Seq2SeqCollator.for_tokenizer(tok)
    references = None
    if evaluation["generate"]:
        references = [ANSWERS[fmt](r, data["fields"]) for r in subset]
    return Evaluator(examples, collate, references=references, tokenizer=tok,
                     batch_size=evaluation["batch_size"],
                     max_new_tokens=evaluation["max_new_tokens"])


def _build_model(spec: dict, tok):
    """The student: a saved model (``path``), or a new one from ``preset``/``overrides``;
    with ``vision``, a vision-language model whose language part is that text model."""
    if spec["path"] is not None:
        model = load_model_dir(spec["path"]).train()
        if model.config.vocab_size != tok.vocab_size:
            raise ConfigError(f"model.path {spec['path']} has a vocabulary of "
                              f"{model.config.vocab_size} but the tokenizer has {tok.vocab_size}")
        if is_vlm_config(model.config) or spec.get("vision") is None:
            return model
        return _vision_language_model(spec, model)
    text = _new_text_model(spec, tok)
    if spec.get("vision") is None:
        return text
    return _vision_language_model(spec, text)


def _new_text_model(spec: dict, tok):
    from ..models import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM

    overrides = dict(spec["overrides"])
    n_layers = overrides.pop("n_layers", None)
    config = EncDecConfig.preset(spec["preset"] or "tiny")
    ids = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
               eos_token_id=tok.eos_id)
    config = config.replace(**{**overrides, **ids})
    if spec["architecture"] == "decoder_only":
        twin = DecoderOnlyConfig.twin_of(config)
        return DecoderOnlyLM(twin if n_layers is None else twin.replace(n_layers=n_layers))
    return EncoderDecoderLM(config)


def _vision_language_model(spec: dict, text_model):
    """Tower (new, or a local Hugging Face CLIP's weights with ``vision.hf``) + projector
    (new) + ``text_model`` as the language part, its weights kept."""
    from ..vision.config import VLMConfig
    from ..vision.models import DecoderOnlyVLM, EncoderDecoderVLM
    from ..vision.projector import Projector
    from ..vision.tower import VisionTower
    from .run_schema import vision_configs

    tower, anyres = vision_configs(spec["vision"])
    config = VLMConfig(text=text_model.config, vision=tower, anyres=anyres)
    cls = EncoderDecoderVLM if config.text.architecture == "encoder_decoder" else DecoderOnlyVLM
    with torch.device("meta"):  # the parts are put in below: no second language model
        model = cls(config)
    if spec["vision"].get("hf") is not None:
        from ..vision.hf_clip import load_hf_clip_vision

        model.vision = load_hf_clip_vision(spec["vision"]["hf"],
                                           feature_layer=tower.feature_layer,
                                           dtype=torch.float32)
    else:
        model.vision = VisionTower(tower)
    model.projector = Projector(tower.width, config.text.d_model)
    model.lm = text_model  # its config is config.text: the VLM reads its fields through it
    return model.train()


def _fingerprint(run: dict) -> dict:
    """The settings besides ``training`` that make a different run (``model.vision``
    only when set, so text runs keep the hash they had before it existed)."""
    data = {k: v for k, v in run["data"].items() if k not in ("valid", "valid_split")}
    model = {k: v for k, v in run["model"].items() if not (k == "vision" and v is None)}
    return {"data": data, "tokenizer": run["tokenizer"], "model_spec": model,
            "teacher": run["teacher"]}


def run_training(run: dict, *, resume: str | None = None, device: str | None = None,
                 overwrite: bool = False, force_resume: bool = False,
                 threads: int | None = None) -> str:
    """Train as the run config says; returns the folder of the saved model.

    On SIGINT/SIGTERM the model is saved too, then
    :class:`~fastencdec.training.TrainingInterrupted` propagates."""
    from .trainer import Trainer

    run = validate_run(run)
    training = dict(run["training"])
    training["overwrite"] = overwrite or training.get("overwrite", False)
    config = TrainConfig.from_dict(training)
    out_dir = run["output_dir"]
    info = init_distributed(device)
    if info.is_main:
        prepare_output_dir(out_dir, resume=resume is not None, overwrite=config.overwrite)
    barrier()
    data = run["data"]
    fmt = data["format"]
    spec_config = model_config(run["model"])  # no tensors: what the data needs to know
    report = os.path.join(out_dir, "bad_rows.txt") if info.is_main else None
    if report is not None and os.path.exists(report):
        os.remove(report)  # written afresh: every start reads (and checks) the data again

    def read(key: str):
        if fmt == "image_text":
            return read_image_text_records(data[key], data, spec_config.anyres,
                                           where=f"data.{key}", report=report,
                                           announce=info.is_main)
        split = data["split"] if key == "train" else data["valid_split"]
        return load_records(data[key], split=split, name=data["name"])

    records = read("train")
    if len(records) == 0:
        raise ConfigError(f"data.train {data['train']} holds no records")
    tok = _run_tokenizer(run, _text_fields(records, fmt), out_dir, info.is_main,
                         resuming=resume is not None)
    examples, lengths, collate = DATA_BUILDERS[fmt](records, tok, data, spec_config)
    evaluator = None
    if data["valid"] is not None:
        evaluator = build_evaluator(read("valid"), tok, data, run["eval"], spec_config)
    sampler = LengthBucketBatchSampler(lengths, data["batch_size"], seed=config.seed)
    stream = BatchStream(examples, sampler, collate, rank=info.rank, world_size=info.world_size)
    torch.manual_seed(config.seed)
    model = _build_model(run["model"], tok)
    n_threads, why = choose_threads(threads, device=info.device,
                                    params=model.num_parameters())
    teacher, vocab_map = None, None
    if run["task"] == "distill":
        vocab_map = _teacher_vocab_map(run["teacher"], tok)
        teacher = load_teacher(run["teacher"], info.device)
    trainer = Trainer(model, config, stream, teacher=teacher, dist_info=info,
                      evaluator=evaluator, fingerprint=_fingerprint(run),
                      teacher_vocab_map=vocab_map)
    if info.device.type == "cpu":
        trainer.notes.insert(0, f"CPU threads: {n_threads} ({why})")
        warn_if_oversubscribed(n_threads)
    # the resume decision was made above: the trainer must not clear the folder again
    trainer.config.overwrite = False
    model_dir = os.path.join(out_dir, "model")
    try:
        trainer.train(resume=resume, force_resume=force_resume)
    except TrainingInterrupted:
        _save_model(trainer, tok, model_dir, info.is_main)
        trainer.close()
        raise
    _save_model(trainer, tok, model_dir, info.is_main)
    trainer.close()
    return model_dir


def _save_model(trainer, tok, model_dir: str, is_main: bool) -> None:
    trainer.save_model(model_dir)
    if is_main:
        tok.save(model_dir)
        best = os.path.join(os.path.dirname(model_dir), "best_model")
        if os.path.isdir(best):
            tok.save(best)
