"""The run-file schema: every key of every section validated, with did-you-mean, types,
ranges, lengths against max_position_embeddings, and --set overrides; all before any
data is read."""

import json

import pytest

from fastencdec.training import ConfigError, TrainConfig
from fastencdec.training.run_config import load_run_file
from fastencdec.training.run_schema import apply_overrides, validate_run


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "context": "c", "answer": "a"}) + "\n")
    return str(path)


def good_run(data_file, tmp_path):
    return {
        "task": "finetune",
        "output_dir": str(tmp_path / "run"),
        "tokenizer": {"train": {"vocab_size": 200, "num_sentinels": 2}},
        "model": {"preset": "tiny", "overrides": {"d_model": 64}},
        "data": {"train": data_file, "format": "qa", "max_source_len": 128, "max_target_len": 8,
                 "batch_size": 4},
        "training": {"max_steps": 3},
    }


def test_a_good_run_gets_its_defaults(data_file, tmp_path):
    run = validate_run(good_run(data_file, tmp_path))
    assert run["data"]["fields"] == {"question": "question", "context": "context",
                                     "answer": "answer"}
    assert run["tokenizer"]["train"]["model_type"] == "unigram"
    assert run["eval"]["max_new_tokens"] == 8 and run["eval"]["generate"] is True
    assert run["teacher"] is None and run["training"]["out_dir"] == str(tmp_path / "run")


@pytest.mark.parametrize("section,key,suggestion", [
    ("data", "batchsize", "batch_size"),
    ("data", "max_source_length", "max_source_len"),
    ("model", "architecure", "architecture"),
    ("model", "prest", "preset"),
    ("tokenizer", "pth", "path"),
    ("training", "learning_rate", "lr"),
    ("training", "warmup_step", "warmup_steps"),
    ("eval", "max_exampels", "max_examples"),
])
def test_unknown_keys_in_every_section(data_file, tmp_path, section, key, suggestion):
    run = good_run(data_file, tmp_path)
    run.setdefault(section, {})[key] = 1
    if section == "eval":
        run["data"]["valid"] = data_file
    with pytest.raises(ConfigError, match=f"{section}: unknown key.*'{key}' "
                                          f"\\(did you mean '{suggestion}'\\?\\)"):
        validate_run(run)


@pytest.mark.parametrize("path,value,message", [
    (("model", "overrides", "architecure"), "x", "model.overrides: unknown key"),
    (("model", "overrides", "vocab_size"), 10, "come.* from the tokenizer"),
    (("tokenizer", "train", "vocab_sise"), 10, "tokenizer.train: unknown key.*vocab_size"),
    (("data", "fields", "anser"), "a", "data.fields \\(format qa\\): unknown key.*'answer'"),
    (("teacher",), {"path": "x"}, "teacher is only used by task 'distill'"),
    (("wandb",), {}, "unknown key.*'wandb'"),
])
def test_unknown_nested_keys(data_file, tmp_path, path, value, message):
    run = good_run(data_file, tmp_path)
    node = run
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        validate_run(run)


@pytest.mark.parametrize("section,key,value,message", [
    ("data", "batch_size", 0, "data.batch_size must be >= 1"),
    ("data", "batch_size", "16", "data.batch_size must be an integer"),
    ("data", "batch_size", True, "data.batch_size must be an integer"),
    ("data", "format", "squad", "data.format must be one of qa, seq2seq, text"),
    ("data", "noise_density", 1.5, "data.noise_density must be <= 0.99"),
    ("training", "lr", 0, "training.lr must be > 0"),
    ("training", "lr", float("nan"), "training.lr must be a finite number"),
    ("training", "optimizer", "sgd", "training.optimizer must be one of auto, muon, adamw"),
    ("training", "progress", "yes", "training.progress must be true or false"),
    ("training", "betas", [0.9], "training.betas must be a list of two numbers"),
    ("model", "preset", "huge", "model.preset: unknown preset 'huge'"),
    ("model", "architecture", "decoder", "model.architecture must be one of encoder_decoder, "
                                         "decoder_only"),
    ("tokenizer", "train", {"model_type": "wordpiece"}, "tokenizer.train.model_type"),
])
def test_types_and_ranges(data_file, tmp_path, section, key, value, message):
    run = good_run(data_file, tmp_path)
    run[section][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_run(run)


def test_model_overrides_are_type_checked(data_file, tmp_path):
    run = good_run(data_file, tmp_path)
    run["model"]["overrides"] = {"n_heads": 5, "n_kv_heads": 2}
    with pytest.raises(ConfigError, match="model.overrides: n_heads"):
        validate_run(run)
    run["model"] = {"architecture": "encoder_decoder", "overrides": {"n_layers": 4}}
    with pytest.raises(ConfigError, match="n_layers is for architecture 'decoder_only'"):
        validate_run(run)


def test_lengths_are_checked_against_the_model(data_file, tmp_path):
    run = good_run(data_file, tmp_path)
    run["data"]["max_source_len"] = 384  # the tiny preset reads 256 positions
    with pytest.raises(ConfigError, match="data.max_source_len \\(384\\) exceeds the model's "
                                          "max_position_embeddings \\(256\\): refused"):
        validate_run(run)
    run["model"]["overrides"]["max_position_embeddings"] = 512
    validate_run(run)
    # a decoder-only twin reads source and target in one sequence (it gets 2 x 512 positions)
    run["model"]["architecture"] = "decoder_only"
    run["data"].update(max_source_len=1000, max_target_len=30)
    with pytest.raises(ConfigError, match="max_source_len \\+ data.max_target_len"):
        validate_run(run)


def test_files_are_checked_before_reading(tmp_path, data_file):
    run = good_run(data_file, tmp_path)
    run["data"]["train"] = "examples/data/nothing_here.jsonl"
    with pytest.raises(ConfigError, match="make it with: python examples/make_synthetic_qa.py"):
        validate_run(run)
    run = good_run(data_file, tmp_path)
    run.update(task="distill", teacher={"path": str(tmp_path / "no-teacher")})
    with pytest.raises(ConfigError, match="train the teacher first"):
        validate_run(run)
    run["teacher"] = {"path": str(tmp_path), "hf": "gpt2"}
    with pytest.raises(ConfigError, match="exactly one of"):
        validate_run(run)


def test_task_and_format_must_agree(data_file, tmp_path):
    run = good_run(data_file, tmp_path)
    run["task"] = "pretrain"
    with pytest.raises(ConfigError, match="data.format 'qa' cannot feed task 'pretrain'"):
        validate_run(run)


def test_overrides(data_file, tmp_path):
    run = good_run(data_file, tmp_path)
    out = apply_overrides(run, ["training.lr=1e-3", "data.batch_size=8",
                                "model.overrides.d_ff=96", "training.betas=[0.8, 0.9]"])
    assert out["training"]["lr"] == 1e-3 and out["data"]["batch_size"] == 8
    assert out["model"]["overrides"] == {"d_model": 64, "d_ff": 96}
    assert run["data"]["batch_size"] == 4  # the original is not changed
    validate_run(out)
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(run, ["training.lr"])
    with pytest.raises(ConfigError, match="'trainig' \\(did you mean 'training'\\?\\)"):
        apply_overrides(run, ["trainig.lr=1"])
    with pytest.raises(ConfigError, match="training.max_steps must be >= 1"):
        validate_run(apply_overrides(run, ["training.max_steps=0"]))


def test_run_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: finetune\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad} is not valid YAML \\(line"):
        load_run_file(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{\"task\": ")
    with pytest.raises(ConfigError, match=f"{bad_json} is not valid JSON"):
        load_run_file(bad_json)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=f"{listed} must hold a mapping"):
        load_run_file(listed)
    with pytest.raises(FileNotFoundError, match="run config not found"):
        load_run_file(tmp_path / "missing.yaml")


def test_train_config_checks_every_field():
    with pytest.raises(ConfigError, match="training.keep_last must be >= 1"):
        TrainConfig(keep_last=0)
    with pytest.raises(ConfigError, match="training.best_metric must be one of"):
        TrainConfig(best_metric="bleu")
    with pytest.raises(ConfigError, match="training.precision"):
        TrainConfig(precision="fp8")
    a, b = TrainConfig(), TrainConfig(max_steps=5, log_every=3, save_every=7, progress=False)
    assert a.fingerprint() == b.fingerprint()  # cadence and length are not identity
    assert a.fingerprint() != TrainConfig(lr=1e-4).fingerprint()


@pytest.mark.parametrize("name", ["finetune_qa.yaml", "pretrain_span.yaml", "teacher_qa.yaml",
                                  "distill_qa.json", "finetune_image_text.yaml"])
def test_example_configs_are_valid(tmp_path, name):
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    text = open(os.path.join(root, name), encoding="utf-8").read()
    # stand-ins for what the data script and the teacher run make
    for made in ("examples/data/qa_train.jsonl", "examples/data/qa_valid.jsonl",
                 "examples/data/text.txt", "runs/teacher-qa/model/tokenizer.model",
                 "examples/data/vqa/train.jsonl", "examples/data/vqa/valid.jsonl"):
        path = tmp_path / made
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
        text = text.replace(made, str(path))
    text = text.replace('"runs/teacher-qa/model"', f'"{tmp_path / "runs/teacher-qa/model"}"')
    config = tmp_path / name
    config.write_text(text)
    run = validate_run(load_run_file(config))
    assert run["output_dir"].startswith("runs/")


def test_training_integer_checks_name_the_argument():
    from fastencdec.argcheck import ArgumentTypeError
    from fastencdec.training import CheckpointManager, WarmupCosineSchedule
    from fastencdec.training.demo import DemoSettings
    from fastencdec.training.threads import choose_threads

    with pytest.raises(ValueError, match="--threads must be a positive int, got 0"):
        choose_threads(0)
    with pytest.raises(ArgumentTypeError, match="--threads must be a positive int, got True"):
        choose_threads(True)
    with pytest.raises(ValueError, match="keep_last must be a positive int, got 0"):
        CheckpointManager("unused", keep_last=0)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        CheckpointManager("unused").save(-1, {})
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        WarmupCosineSchedule(None, warmup_steps=0, total_steps=0)
    with pytest.raises(ValueError, match="--seed must be a non-negative int, got -3"):
        DemoSettings.for_mode(seed=-3, device="cpu")
    with pytest.raises(ArgumentTypeError, match="--steps must be a positive int, got 2.5"):
        DemoSettings.for_mode(steps=2.5, device="cpu")
