"""Vision-language models from a run file (`fastencdec train`): image + text JSONL
(bad rows skipped and reported by row number, or refused before any step), the
`model.vision` section, the two stages as freeze flags and a per-part learning rate,
distillation from a saved vision-language teacher, and a saved model that
`load_vlm` / `fastencdec generate --image` read back."""

import copy
import json
import math
import os

import pytest
import torch

from fastencdec import cli
from fastencdec.data import (
    BatchStream,
    LengthBucketBatchSampler,
    Seq2SeqEncoder,
    load_tokenizer,
)
from fastencdec.training import (
    CheckpointError,
    ConfigError,
    TrainConfig,
    Trainer,
    build_optimizer,
    read_metrics,
)
from fastencdec.training.run_config import _build_model, run_training
from fastencdec.training.run_schema import validate_run
from fastencdec.vision import DecoderOnlyVLM, EncoderDecoderVLM, load_vlm
from fastencdec.vision.anyres import AnyResConfig
from fastencdec.vision.config import VLMConfig
from fastencdec.vision.data import ImageTextCollator, load_image_text_examples
from fastencdec.vision.synthetic import VisualQA
from fastencdec.vision.tower import VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = [[1, 1], [2, 1], [2, 2]]
QUESTION = "what colour is the triangle?"


def _write_rows(folder, name, examples, extra=()):
    rows = []
    for i, ex in enumerate(examples):
        image = f"images/{name}_{i}.png"
        ex["image"].save(folder / image)
        rows.append(json.dumps({"image": image, "source": ex["source"], "target": ex["target"]}))
    for row, text in extra:  # (1-based row number, raw line)
        rows.insert(row - 1, text)
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    """Synthetic visual QA as JSONL: ``train`` (12 good rows), ``valid`` (4 rows) and
    ``train_bad`` (the 12 rows with a missing image at row 3 and broken JSON at row 5)."""
    folder = tmp_path_factory.mktemp("vqa")
    (folder / "images").mkdir()
    task = VisualQA(cell=32, canvases=((2, 2), (3, 1)), seed=5)
    train = task.generate(12)
    bad = [(3, json.dumps({"image": "images/missing.png", "source": QUESTION,
                           "target": "red"})),
           (5, "{not json")]
    return {"folder": folder,
            "train": _write_rows(folder, "train", train),
            "valid": _write_rows(folder, "valid", task.generate(4, split="valid")),
            "train_bad": _write_rows(folder, "train_bad", task.generate(12), extra=bad)}


def image_run(vqa, out_dir, **sections):
    run = {
        "task": "finetune",
        "output_dir": str(out_dir),
        "tokenizer": {"train": {"vocab_size": 40, "num_sentinels": 0, "model_type": "word"}},
        "model": {"preset": "tiny", "vision": {"preset": "tiny", "grid": GRID}},
        "data": {"train": vqa["train"], "valid": vqa["valid"], "format": "image_text",
                 "max_source_len": 12, "max_target_len": 3, "batch_size": 4},
        "eval": {"max_examples": 4, "max_new_tokens": 3},
        "training": {"max_steps": 3, "warmup_steps": 1, "lr": 3e-3, "optimizer": "adamw",
                     "log_every": 1, "progress": False, "seed": 0},
    }
    for key, value in sections.items():
        run[key] = {**run.get(key, {}), **value} if isinstance(value, dict) else value
    return run


# ----------------------------------------------------------------- end to end
@pytest.mark.parametrize("arch,cls", [("encoder_decoder", EncoderDecoderVLM),
                                      ("decoder_only", DecoderOnlyVLM)])
def test_run_file_trains_saves_and_generates(vqa, tmp_path, capsys, arch, cls):
    run = image_run(vqa, tmp_path / "run", model={"architecture": arch})
    model_dir = run_training(run, device="cpu", threads=1)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    evals = [r for r in rows if r["split"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["exact_match"] <= 1.0
    assert math.isfinite(evals[0]["loss"])

    model = load_vlm(model_dir)
    assert type(model) is cls and model.config.text.architecture == arch
    assert model.config.anyres.pinpoints == ((32, 32), (64, 32), (64, 64))
    image = str(vqa["folder"] / "images" / "valid_0.png")
    capsys.readouterr()
    rc = cli.main(["generate", "--model", model_dir, "--image", image, "--prompt", QUESTION,
                   "--max-new-tokens", "3", "--device", "cpu", "--threads", "1"])
    printed = capsys.readouterr().out
    assert rc == 0 and printed.count("\n") == 1
    tok = load_tokenizer(model_dir)
    batch = tok([QUESTION])
    out = model.generate(batch["input_ids"], batch["attention_mask"], images=[image],
                         max_new_tokens=3, eos_token_id=tok.eos_id)
    assert printed == tok.batch_decode(out)[0] + "\n"

    # without an image, the text-only path says what the folder holds
    rc = cli.main(["generate", "--model", model_dir, "--prompt", QUESTION, "--device", "cpu"])
    assert rc == 2 and "holds a vision-language model" in capsys.readouterr().err

    # `fastencdec eval` reads the held-out image-text rows with the saved model
    rc = cli.main(["eval", "--model", model_dir, "--data", vqa["valid"], "--device", "cpu",
                   "--threads", "1", "--max-new-tokens", "3"])
    report = capsys.readouterr().out
    assert rc == 0 and f"4 examples of {vqa['valid']} (image_text)" in report
    assert f"loss         {evals[0]['loss']:.4f}" in report  # the trainer's own evaluation


def test_bad_rows_are_skipped_and_reported_by_row_number(vqa, tmp_path):
    run = image_run(vqa, tmp_path / "run", data={"train": vqa["train_bad"], "valid": None},
                    eval=None, training={"max_steps": 2})
    run.pop("eval")
    with pytest.warns(UserWarning, match="data.train: skipped 2 bad image-text row") as caught:
        run_training(run, device="cpu", threads=1)
    message = str(next(w.message for w in caught if "skipped" in str(w.message)))
    assert f"{vqa['train_bad']}:3: " in message and "missing.png" in message
    assert f"{vqa['train_bad']}:5: invalid JSON" in message
    listed = (tmp_path / "run" / "bad_rows.txt").read_text().splitlines()
    assert [line.split(":")[1] for line in listed] == ["3", "5"]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2  # trained on the rest


def test_bad_rows_can_stop_the_run_before_any_step(vqa, tmp_path):
    run = image_run(vqa, tmp_path / "run", data={"train": vqa["train_bad"],
                                                 "on_bad_row": "error"})
    with pytest.raises(ConfigError, match=r"data.train: 2 bad image-text row\(s\), nothing "
                                          r"trained \(data.on_bad_row: error\)") as err:
        run_training(run, device="cpu", threads=1)
    assert f"{vqa['train_bad']}:3:" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "model").exists()


# ----------------------------------------------------------------- the two stages
def test_stage_one_from_a_run_file_trains_the_projector_only(vqa, tmp_path):
    run = image_run(vqa, tmp_path / "run", training={"freeze_vision": True, "freeze_lm": True,
                                                     "max_steps": 2})
    model_dir = run_training(run, device="cpu", threads=1)
    # the same initial model: run_training seeds torch with training.seed before building it
    torch.manual_seed(0)
    initial = _build_model(validate_run(run)["model"], load_tokenizer(model_dir)).state_dict()
    trained = load_vlm(model_dir).state_dict()
    changed = {k.split(".")[0] for k in trained if not torch.equal(initial[k], trained[k])}
    assert changed == {"projector"}


@pytest.fixture(scope="module")
def image_stream(vqa):
    """A factory of endless image + text batch streams (byte-level ids)."""

    class Bytes:
        pad_id, bos_id, eos_id = 0, 1, 2

        def encode(self, text, *, add_eos=False, max_length=None):
            ids = [b + 4 for b in text.encode()][:max_length]
            return ids + [self.eos_id] if add_eos else ids

    anyres = AnyResConfig(crop_size=32)
    encoder = Seq2SeqEncoder(Bytes(), max_source_len=40, max_target_len=8)
    examples, _ = load_image_text_examples(vqa["train"], encoder, anyres)

    def make():
        collate = ImageTextCollator(anyres, tokens_per_crop=VisionConfig.preset(
            "tiny").tokens_per_crop)
        sampler = LengthBucketBatchSampler([len(e["input_ids"]) for e in examples], 4, seed=0)
        return BatchStream(examples, sampler, collate)

    return make


def _vlm(seed=0):
    from fastencdec import EncDecConfig

    torch.manual_seed(seed)
    return EncoderDecoderVLM(VLMConfig(text=EncDecConfig.preset("tiny"),
                                       vision=VisionConfig.preset("tiny"),
                                       anyres=AnyResConfig(crop_size=32)))


@pytest.mark.parametrize("frozen", [("vision",), ("vision", "lm"), ("projector",),
                                    ("lm",), ("vision", "projector")])
def test_freeze_flags_freeze_exactly_the_named_parts(image_stream, frozen):
    model = _vlm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(max_steps=2, warmup_steps=1, lr=3e-3, optimizer="adamw",
                         progress=False, **{f"freeze_{p}": True for p in frozen})
    trainer = Trainer(model, config, image_stream(), device="cpu")
    handed = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for part in ("vision", "projector", "lm"):
        params = list(getattr(model, part).parameters())
        inside = [id(p) in handed for p in params]
        assert all(inside) if part not in frozen else not any(inside), part
        assert all(p.requires_grad == (part not in frozen) for p in params), part
    trainer.train()
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision", "projector", "lm"} - set(frozen)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_tower_lr_is_the_configured_fraction_at_every_step(image_stream, optimizer):
    model = _vlm()
    config = TrainConfig(max_steps=4, warmup_steps=2, lr=2e-3, optimizer=optimizer,
                         progress=False, lr_multipliers={"vision": 0.1, "projector": 2.0})
    trainer = Trainer(model, config, image_stream(), device="cpu")
    part_of = {id(p): name.split(".")[0] for name, p in model.named_parameters()}
    seen = []
    for _ in range(config.max_steps + 1):  # the last: after the final scheduler step
        base = trainer.base_lr()
        seen.append(base)
        for group in trainer.optimizer.param_groups:
            parts = {part_of[id(p)] for p in group["params"]}
            assert len(parts) == 1  # a group never mixes parts of different rates
            factor = {"vision": 0.1, "projector": 2.0}.get(parts.pop(), 1.0)
            assert group["lr"] == pytest.approx(base * factor, rel=1e-12)
        if trainer.step < config.max_steps:
            trainer.train(steps=1)
    # the schedule moved the rates (warmup then decay), each part kept its fraction
    assert seen[0] == pytest.approx(1e-3) and max(seen) == pytest.approx(2e-3)
    assert seen[-1] < max(seen)
    assert all(math.isfinite(r["loss"]) for r in trainer.history)
    kinds = [type(o).__name__ for o in trainer.optimizer.optimizers]
    assert kinds == (["AdamW", "Muon"] if optimizer == "muon" else ["AdamW"])


def test_build_optimizer_gives_each_part_its_rate_and_skips_frozen_parts():
    model = _vlm()
    model.lm.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, use_muon=True, lr_multipliers={"vision": 0.5})
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {}
    for group in opt.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = group["lr"]
    assert not any(n.startswith("lm.") for n in rates)
    assert {n for n in rates} == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(r == pytest.approx(5e-4) for n, r in rates.items() if n.startswith("vision."))
    assert all(r == pytest.approx(1e-3) for n, r in rates.items() if n.startswith("projector."))
    assert [type(o).__name__ for o in opt.optimizers] == ["AdamW", "Muon"]
    with pytest.raises(ValueError, match="has no part 'tower'; its parts: vision, projector, lm"):
        build_optimizer(model, lr_multipliers={"tower": 0.1})
    with pytest.raises(ValueError, match=r"lr_multipliers\['vision'\] must be a finite number"):
        build_optimizer(model, lr_multipliers={"vision": 0})
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model)


def test_freeze_flags_need_a_vision_language_model():
    from fastencdec import EncDecConfig, EncoderDecoderLM

    text = EncoderDecoderLM(EncDecConfig.preset("tiny"))
    with pytest.raises(ValueError, match="training.freeze_vision: EncoderDecoderLM has no "
                                         "'vision' part"):
        Trainer(text, TrainConfig(freeze_vision=True, progress=False), iter(()), device="cpu")
    with pytest.raises(ConfigError, match="all true: nothing would train"):
        TrainConfig(freeze_vision=True, freeze_projector=True, freeze_lm=True)
    with pytest.raises(ConfigError, match="lr_multipliers.vision: that part is frozen"):
        TrainConfig(freeze_vision=True, lr_multipliers={"vision": 0.1})


# ----------------------------------------------------------------- distillation
def test_distill_from_a_saved_vision_language_teacher(vqa, tmp_path):
    teacher_run = image_run(vqa, tmp_path / "teacher", model={"architecture": "decoder_only"},
                            data={"valid": None}, training={"max_steps": 2})
    teacher_run.pop("eval")
    teacher_dir = run_training(teacher_run, device="cpu", threads=1)
    student = image_run(vqa, tmp_path / "student", task="distill",
                        tokenizer={"path": os.path.join(teacher_dir, "tokenizer.model")},
                        teacher={"path": teacher_dir},
                        training={"max_steps": 2, "alpha": 0.5})
    student["tokenizer"].pop("train")
    model_dir = run_training(student, device="cpu", threads=1)
    rows = [r for r in read_metrics(tmp_path / "student" / "metrics.jsonl")
            if r["split"] == "train"]
    assert len(rows) == 2
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) and r["kl"] > -1e-4
               for r in rows)
    assert type(load_vlm(model_dir)) is EncoderDecoderVLM

    # a teacher that cuts images differently, or reads no images, is refused up front
    other = copy.deepcopy(student)
    other["model"]["vision"]["variance_k"] = 1
    with pytest.raises(ConfigError, match="the teacher cuts images differently "
                                          r"\(variance_k: teacher None, student 1\)"):
        validate_run(other)
    other = copy.deepcopy(student)
    other["model"]["vision"]["patch_size"] = 16
    with pytest.raises(ConfigError, match="16 tokens per crop, the student's 4"):
        validate_run(other)
    other = copy.deepcopy(student)
    other["teacher"] = {"hf": "gpt2"}
    with pytest.raises(ConfigError, match="teacher.hf: image-text distillation needs a "
                                          "fastencdec vision-language teacher"):
        validate_run(other)


# ----------------------------------------------------------------- the run file
@pytest.mark.parametrize("vision,message", [
    ({"patch": 8}, r"model.vision: unknown key\(s\) 'patch' \(did you mean 'patch_size'\?\)"),
    ({"top_k": 2}, r"'top_k' \(did you mean 'variance_k'\?\)"),
    ({"preset": "clip"}, "model.vision.preset: unknown preset 'clip'"),
    ({"patch_size": 0}, "model.vision.patch_size must be >= 1"),
    ({"width": 99}, r"model.vision: vision width \(99\) must be a multiple of n_heads"),
    ({"image_size": 30}, r"model.vision: vision image_size \(30\) must be a multiple of "
                         "patch_size"),
    ({"grid": [[2, 0]]}, r"model.vision.grid must be a non-empty list of \[width, height\]"),
    ({"variance_k": -1}, "model.vision.variance_k must be >= 0"),
    ({"std": [1, 1]}, r"model.vision.std must be a list of 3 numbers"),
    ({"std": [1, 0, 1]}, r"model.vision.std\[1\] must be > 0"),
    ({"projector": "linear"}, "model.vision.projector must be one of mlp2x_gelu"),
    ({"tokens_per_crop": 9}, r"model.vision.tokens_per_crop: the tower gives \(image_size / "
                             r"patch_size\)\^2 = \(32 / 8\)\^2 = 16 tokens per crop, not 9"),
    ({"activation": "relu"}, "model.vision.activation must be one of quick_gelu, gelu"),
    ({"hf": "no/such/clip"}, "model.vision.hf: folder no/such/clip not found"),
    # a 4x4 grid: 17 crops x 16 tokens + a 12-token prompt > the tiny model's 256 positions
    ({"grid": [[4, 4]]}, r"272 image tokens \(17 crops x 16 tokens per crop\) \+ "
                         r"data.max_source_len \(12\) = 284 exceed\(s\) the model's "
                         r"max_position_embeddings \(256\)"),
])
def test_bad_model_vision_keys_name_the_key(vqa, tmp_path, vision, message):
    run = image_run(vqa, tmp_path / "run")
    run["model"]["vision"] = vision
    with pytest.raises(ConfigError, match=message):
        validate_run(run)


def test_format_and_model_must_agree(vqa, tmp_path):
    run = image_run(vqa, tmp_path / "run")
    no_vision = copy.deepcopy(run)
    no_vision["model"].pop("vision")
    with pytest.raises(ConfigError, match="data.format 'image_text' needs a vision-language "
                                          "model: add a model.vision section"):
        validate_run(no_vision)
    text = copy.deepcopy(run)
    text["data"]["format"] = "seq2seq"
    with pytest.raises(ConfigError, match="model.vision: a vision-language model trains on "
                                          "data.format 'image_text'"):
        validate_run(text)
    frozen_text = copy.deepcopy(no_vision)
    frozen_text["data"]["format"] = "seq2seq"
    frozen_text["training"]["freeze_lm"] = True
    with pytest.raises(ConfigError, match="training.freeze_lm is for vision-language models"):
        validate_run(frozen_text)
    tower = copy.deepcopy(run)
    tower["training"]["lr_multipliers"] = {"tower": 0.1}
    with pytest.raises(ConfigError, match=r"training.lr_multipliers: unknown key\(s\) 'tower' "
                                          r"\(did you mean 'vision'\?\)"):
        validate_run(tower)
    on_text = copy.deepcopy(no_vision)
    on_text["data"].update(format="seq2seq", on_bad_row="error")
    with pytest.raises(ConfigError, match="data.on_bad_row is for data.format 'image_text'"):
        validate_run(on_text)
    folder = copy.deepcopy(run)
    folder["data"]["train"] = str(vqa["folder"])
    with pytest.raises(ConfigError, match="format image_text reads JSONL files"):
        validate_run(folder)


def test_a_saved_vlm_continues_as_the_next_stage(vqa, tmp_path):
    """Stage 2 starts from stage 1's saved model (model.path); its vision settings come
    with it, so model.vision is refused alongside."""
    first = image_run(vqa, tmp_path / "one", data={"valid": None},
                      training={"max_steps": 1, "freeze_vision": True, "freeze_lm": True})
    first.pop("eval")
    stage_one = run_training(first, device="cpu", threads=1)
    second = image_run(vqa, tmp_path / "two", data={"valid": None},
                       tokenizer={"path": os.path.join(stage_one, "tokenizer.model")},
                       training={"max_steps": 1, "freeze_vision": True})
    second.pop("eval")
    second["tokenizer"].pop("train")
    second["model"] = {"path": stage_one, "vision": {"preset": "tiny"}}
    with pytest.raises(ConfigError, match="model.vision: model.path .* is a saved "
                                          "vision-language model"):
        validate_run(second)
    second["model"] = {"path": stage_one}
    before = load_vlm(stage_one).state_dict()
    after = load_vlm(run_training(second, device="cpu", threads=1)).state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector", "lm"}


def test_vlm_config_load_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{\"architecture\": ")
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        VLMConfig.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path} must hold a JSON object"):
        VLMConfig.load(path)
    from fastencdec import EncDecConfig

    path.write_text(json.dumps({"text": EncDecConfig.preset("tiny").to_dict()}))
    with pytest.raises(ValueError, match=f"{path}: missing 'vision'"):
        load_vlm(tmp_path)


def test_new_training_fields_keep_old_configuration_hashes():
    # hashes of these configs before the vision options existed: checkpoints written
    # then still resume
    assert TrainConfig().fingerprint() == "b1dbc71ccf44677b"
    assert TrainConfig(lr=1e-3, task="distill").fingerprint(model={"a": 1}) == "2d44205c366c2de1"
    assert TrainConfig(freeze_vision=True).fingerprint() != TrainConfig().fingerprint()
    assert TrainConfig(lr_multipliers={"vision": 0.1}).fingerprint() != \
        TrainConfig(lr_multipliers={"vision": 0.2}).fingerprint()


def test_an_image_run_resumes_with_its_frozen_parts(vqa, tmp_path):
    run = image_run(vqa, tmp_path / "run", data={"valid": None},
                    training={"max_steps": 2, "freeze_vision": True,
                              "lr_multipliers": {"projector": 0.5}})
    run.pop("eval")
    first = load_vlm(run_training(run, device="cpu", threads=1)).state_dict()
    run["training"]["max_steps"] = 4
    again = load_vlm(run_training(run, device="cpu", threads=1, resume="auto")).state_dict()
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    changed = {k.split(".")[0] for k in first if not torch.equal(first[k], again[k])}
    assert changed == {"projector", "lm"}
    run["training"]["lr_multipliers"] = {"projector": 0.25}  # another run: refused
    run["training"]["max_steps"] = 6
    with pytest.raises(CheckpointError, match="different configuration"):
        run_training(run, device="cpu", threads=1, resume="auto")


def test_on_policy_distillation_samples_with_the_images(image_stream):
    from fastencdec import DecoderOnlyConfig, EncDecConfig
    from fastencdec.training import sample_student_targets

    student = _vlm()
    torch.manual_seed(1)
    teacher = DecoderOnlyVLM(VLMConfig(text=DecoderOnlyConfig.twin_of(EncDecConfig.preset("tiny")),
                                       vision=VisionConfig.preset("tiny"),
                                       anyres=AnyResConfig(crop_size=32)))
    batch = next(image_stream())
    # the samples are the student's answers to prompt + image (not to bare image slots)
    sampled = sample_student_targets(student, batch, max_new_tokens=4,
                                     generator=torch.Generator().manual_seed(0))
    expected = student.generate(batch["input_ids"], batch["attention_mask"], do_sample=True,
                                max_new_tokens=4, eos_token_id=2,
                                generator=torch.Generator().manual_seed(0),
                                image_pixels=batch["image_pixels"],
                                image_crop_mask=batch["image_crop_mask"], image_slots=True)
    real = sampled["labels"] != -100
    assert sampled["labels"].shape == expected.shape and bool(real[:, 0].all())
    assert torch.equal(sampled["labels"][real], expected[real])
    assert sampled["image_pixels"] is batch["image_pixels"]
    config = TrainConfig(task="distill", max_steps=2, warmup_steps=1, optimizer="adamw",
                         on_policy=1.0, max_new_tokens=4, progress=False)
    history = Trainer(student, config, image_stream(), teacher=teacher, device="cpu").train()
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)


def test_synthetic_visual_qa_checks_its_arguments():
    with pytest.raises(ValueError, match=r"canvas \(2, 1\) has 2 cell\(s\); each canvas needs "
                                         "at least 3"):
        VisualQA(canvases=((2, 2), (2, 1)))
    with pytest.raises(ValueError, match="canvases must hold \\(columns, rows\\) pairs"):
        VisualQA(canvases=(3,))
    with pytest.raises(ValueError, match="cell must be a positive int, got 0"):
        VisualQA(cell=0)
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        VisualQA().generate(-1)
    with pytest.raises(ValueError, match="split must be 'train', 'valid' or 'test'"):
        VisualQA().generate(2, split="dev")
    assert VisualQA().generate(0) == []


def _two_process_run(rank, world_size, strategy, port, folder, out):
    from _helpers import join_test_group

    info = join_test_group(rank, world_size, port)
    anyres = AnyResConfig(crop_size=32)

    class Bytes:
        pad_id, bos_id, eos_id = 0, 1, 2

        def encode(self, text, *, add_eos=False, max_length=None):
            ids = [b + 4 for b in text.encode()][:max_length]
            return ids + [self.eos_id] if add_eos else ids

    encoder = Seq2SeqEncoder(Bytes(), max_source_len=40, max_target_len=8)
    examples, _ = load_image_text_examples(os.path.join(folder, "train.jsonl"), encoder, anyres)
    sampler = LengthBucketBatchSampler([len(e["input_ids"]) for e in examples], 2, seed=0)
    stream = BatchStream(examples, sampler, ImageTextCollator(anyres, tokens_per_crop=16),
                         rank=info.rank, world_size=info.world_size)
    config = TrainConfig(max_steps=2, grad_accum=3 - world_size, lr=1e-2, warmup_steps=0,
                         distributed=strategy, optimizer="adamw", progress=False,
                         freeze_vision=True, lr_multipliers={"projector": 0.5})
    trainer = Trainer(_vlm(), config, stream, dist_info=info)
    history = trainer.train()
    trainer.save_model(out + ".model")
    if info.rank == 0:
        torch.save([r["loss"] for r in history], out)
    if world_size > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_a_frozen_vlm_like_one(vqa, tmp_path, strategy):
    """DDP / FSDP2 (gloo) with a frozen tower and a per-part rate: the same losses as
    one process accumulating the same micro-batches, and the saved model reloads."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    single, multi = str(tmp_path / "single.pt"), str(tmp_path / "multi.pt")
    _two_process_run(0, 1, strategy, 0, str(vqa["folder"]), single)
    mp.spawn(_two_process_run, args=(2, strategy, port, str(vqa["folder"]), multi), nprocs=2,
             join=True)
    a, b = torch.load(single), torch.load(multi)
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    one, two = load_vlm(single + ".model").state_dict(), load_vlm(multi + ".model").state_dict()
    initial = _vlm().state_dict()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5)
        if name.startswith("vision."):
            assert torch.equal(two[name], initial[name]), name
