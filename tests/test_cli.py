"""The command line: every user error is one line on stderr with exit code 2 (a
traceback only with --debug), ranges are checked before any work, the output folder
is protected, a signal stops cleanly (exit 143), overrides, eval and generate."""

import json
import os
import signal

import pytest
import torch

from fastencdec import cli
from fastencdec.data import SyntheticQA
from fastencdec.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def write_qa(path, n, seed=0, split="train"):
    task = SyntheticQA(facts=(1, 2), fillers=(0, 1), seed=seed)
    path.write_text("\n".join(json.dumps({"question": e["question"], "context": e["context"],
                                          "answer": e["target"]})
                              for e in task.generate(n, split=split)) + "\n")
    return str(path)


def run_config(tmp_path, name="run", **sections):
    run = {
        "task": "finetune",
        "output_dir": str(tmp_path / name),
        "tokenizer": {"train": {"vocab_size": 200, "num_sentinels": 2, "model_type": "bpe"}},
        "model": {"preset": "tiny", "overrides": {"d_model": 64, "d_ff": 128}},
        "data": {"train": write_qa(tmp_path / "qa.jsonl", 48), "format": "qa", "batch_size": 8,
                 "max_source_len": 128, "max_target_len": 8},
        "training": {"max_steps": 2, "warmup_steps": 1, "log_every": 1},
    }
    for key, value in sections.items():
        run[key] = {**run.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(run))
    return str(path)


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by `fastencdec train` (shared by the generate/eval tests)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = run_config(tmp, training={"max_steps": 3})
    old = torch.get_num_threads()
    assert cli.main(["train", "--config", config, "--device", "cpu", "--threads", "1"]) == 0
    torch.set_num_threads(old)
    return tmp


# ----------------------------------------------------------------- one-line errors
def test_missing_config_file(capsys, tmp_path):
    rc = cli.main(["train", "--config", str(tmp_path / "nope.yaml")])
    one_line_error(capsys, rc, "fastencdec train: error:", "run config not found", "nope.yaml")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    argv = ["train", "--config", str(tmp_path / "nope.yaml")]
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", *argv] if where == "before" else [*argv, "--debug"])


def test_bad_yaml_names_the_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: finetune\ndata:\n  train: [a, b\n")
    rc = cli.main(["train", "--config", str(bad)])
    one_line_error(capsys, rc, str(bad), "not valid YAML", "line")


@pytest.mark.parametrize("section,key,hint", [
    ("data", "batchsize", "batch_size"), ("model", "architecure", "architecture"),
    ("model", "prest", "preset"), ("training", "learning_rate", "lr")])
def test_typos_are_caught_before_any_work(capsys, tmp_path, section, key, hint):
    config = run_config(tmp_path, **{section: {key: 1}})
    rc = cli.main(["train", "--config", config])
    one_line_error(capsys, rc, f"'{key}' (did you mean '{hint}'?)")
    assert not os.path.exists(tmp_path / "run")  # nothing was read, built or written


def test_unknown_preset_and_bad_values(capsys, tmp_path):
    rc = cli.main(["train", "--config", run_config(tmp_path, model={"preset": "giant"})])
    one_line_error(capsys, rc, "model.preset", "giant")
    rc = cli.main(["train", "--config", run_config(tmp_path, data={"batch_size": -1})])
    one_line_error(capsys, rc, "data.batch_size must be >= 1")
    rc = cli.main(["train", "--config", run_config(tmp_path), "--set", "training.lr=-1"])
    one_line_error(capsys, rc, "training.lr must be > 0")


@pytest.mark.parametrize("argv,needle", [
    (["demo", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["demo", "--threads", "0"], "--threads: must be >= 1"),
    (["demo", "--seed", "x"], "--seed: expected an integer"),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "1.5"], "--top-p: must lie in"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "inf"], "--temperature"),
    (["train", "--config", "x.yaml", "--max-steps", "0"], "--max-steps: must be >= 1"),
    (["demo", "--device", "tpu"], "expected cpu or cuda"),
])
def test_argument_ranges_fail_before_work(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr()
    assert err.out == ""  # nothing ran
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("command", [["demo"], ["train", "--config", "x.yaml"],
                                     ["generate", "--model", "m", "--prompt", "p"]])
def test_cuda_without_cuda_is_one_line(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--device", "cuda"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available on this machine" in lines[0]


def test_missing_example_data_says_how_to_make_it(capsys, tmp_path):
    config = run_config(tmp_path, data={"train": "examples/data/missing_qa.jsonl"})
    rc = cli.main(["train", "--config", config])
    one_line_error(capsys, rc, "python examples/make_synthetic_qa.py")


def test_sequence_longer_than_the_model_is_refused(capsys, tmp_path):
    config = run_config(tmp_path, data={"max_source_len": 384})
    rc = cli.main(["train", "--config", config])
    one_line_error(capsys, rc, "exceeds the model's max_position_embeddings (256)")


# ----------------------------------------------------------------- runs
def test_output_dir_is_refused_then_overwritten(capsys, tmp_path):
    config = run_config(tmp_path)
    assert cli.main(["train", "--config", config, "--device", "cpu"]) == 0
    capsys.readouterr()
    rc = cli.main(["train", "--config", config, "--device", "cpu"])
    one_line_error(capsys, rc, "is not empty", "--resume auto", "--overwrite")
    assert cli.main(["train", "--config", config, "--device", "cpu", "--overwrite",
                     "--max-steps", "1"]) == 0
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1]
    capsys.readouterr()
    rc = cli.main(["train", "--config", config, "--device", "cpu", "--resume", "auto",
                   "--set", "training.lr=1e-4"])
    one_line_error(capsys, rc, "different configuration", "--force-resume")


def test_sigterm_saves_and_exits_143(capsys, tmp_path, monkeypatch):
    plain = Trainer.train_step

    def step_then_term(self):
        record = plain(self)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_term)
    config = run_config(tmp_path, training={"max_steps": 50})
    rc = cli.main(["train", "--config", config, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 143
    assert err.strip().splitlines()[-1] == "interrupted at step 2; resume with --resume auto"
    assert "Traceback" not in err
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert (run / "model" / "model.safetensors").is_file()
    monkeypatch.setattr(Trainer, "train_step", plain)
    assert cli.main(["train", "--config", config, "--device", "cpu", "--resume", "auto",
                     "--max-steps", "4"]) == 0
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_eval_command(capsys, trained, tmp_path):
    valid = write_qa(tmp_path / "valid.jsonl", 12, split="valid")
    out = tmp_path / "metrics.json"
    preds = tmp_path / "preds.jsonl"
    assert cli.main(["eval", "--model", str(trained / "run" / "model"), "--data", valid,
                     "--device", "cpu", "--max-new-tokens", "4", "--json", str(out),
                     "--predictions", str(preds)]) == 0
    printed = capsys.readouterr().out
    for key in ("loss", "exact_match", "token_f1", "rouge_l"):
        assert key in printed
    result = json.loads(out.read_text())
    assert result["examples"] == 12 and result["format"] == "qa"
    assert 0.0 <= result["exact_match"] <= result["token_f1"] + 1e-9 <= 1.0 + 1e-9
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 12 and {"prediction", "reference"} == set(rows[0])
    rc = cli.main(["eval", "--model", str(tmp_path / "nowhere"), "--data", valid])
    one_line_error(capsys, rc, "model folder not found")


def test_generate_dtype(capsys, trained):
    model = str(trained / "run" / "model")
    base = ["generate", "--model", model, "--prompt", "Where does Maria live?", "--context",
            "Maria lives in Lisbon.", "--max-new-tokens", "3", "--device", "cpu"]
    assert cli.main(base) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    try:
        from fastencdec.models.quantize import to_inference  # noqa: F401
    except ImportError:
        rc = cli.main([*base, "--dtype", "int8"])
        one_line_error(capsys, rc, "--dtype int8 is unavailable")
    else:
        assert cli.main([*base, "--dtype", "bf16"]) == 0


def test_export_then_generate_on_the_runtime_without_torch(capsys, trained, tmp_path):
    """`export` writes an int8 folder with the tokenizer; `generate` gives the same text
    from it on the torch model and on the torch-free runtime (whose process never
    imports torch)."""
    import subprocess
    import sys

    model, out = str(trained / "run" / "model"), str(tmp_path / "int8")
    assert cli.main(["export", "--model", model, "--dtype", "int8", "--out", out]) == 0
    assert "int8 model written" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    base = ["generate", "--model", out, "--prompt", "Where does Maria live?", "--prompt",
            "Who?", "--context", "Maria lives in Lisbon.", "--max-new-tokens", "4"]
    assert cli.main([*base, "--device", "cpu", "--threads", "1"]) == 0
    on_torch = capsys.readouterr().out
    assert len(on_torch.splitlines()) == 2
    script = ("import sys; from fastencdec import cli; rc = cli.main(sys.argv[1:]); "
              "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, *base, "--runtime", "--threads", "1",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == on_torch
    assert done.stderr.strip().splitlines()[-1] == "False"
    # a user error stays one line, exit code 2, and still loads no torch
    done = subprocess.run([sys.executable, "-c", script, "generate", "--model", model,
                           "--prompt", "p", "--runtime"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "fastencdec generate: error: --runtime serves int8/bf16 folders written by "
        f"`fastencdec export` (or save_inference); {model} holds float weights", "False"]
    rc = cli.main(["generate", "--model", model, "--prompt", "p", "--runtime"])
    one_line_error(capsys, rc, "--runtime serves int8/bf16 folders", "float weights")
    rc = cli.main([*base, "--runtime", "--dtype", "bf16"])
    one_line_error(capsys, rc, "holds int8 weights, not --dtype bf16")
    rc = cli.main(["export", "--model", model, "--dtype", "bf16", "--out", out])
    one_line_error(capsys, rc, "exists and is not empty")
    rc = cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "p",
                   "--runtime"])
    one_line_error(capsys, rc, "model folder not found")


def test_export_keeps_a_json_tokenizers_special_tokens(capsys, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from fastencdec import EncDecConfig, EncoderDecoderLM
    from fastencdec.data import JsonTokenizer, load_tokenizer

    tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[U]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4,
                           tokenizers.trainers.BpeTrainer(
                               vocab_size=60, special_tokens=["[P]", "[B]", "[E]", "[U]"]))
    names = {"pad": "[P]", "bos": "[B]", "eos": "[E]", "unk": "[U]"}
    model_dir = tmp_path / "model"
    EncoderDecoderLM(EncDecConfig.preset("tiny")).save_pretrained(model_dir)
    JsonTokenizer(tk, special_tokens=names).save(model_dir)
    out = tmp_path / "int8"
    assert cli.main(["export", "--model", str(model_dir), "--dtype", "int8",
                     "--out", str(out)]) == 0
    assert "with its tokenizer" in capsys.readouterr().out
    before, after = load_tokenizer(model_dir), load_tokenizer(out)
    assert (after.pad_id, after.bos_id, after.eos_id, after.unk_id) == \
        (before.pad_id, before.bos_id, before.eos_id, before.unk_id) == (0, 1, 2, 3)


def test_distill_refuses_a_teacher_with_another_tokenizer(capsys, trained, tmp_path):
    # the teacher's tokenizer was trained on other text: same size, other pieces
    config = run_config(tmp_path, task="distill",
                        teacher={"path": str(trained / "run" / "model")},
                        tokenizer={"train": {"vocab_size": 200, "num_sentinels": 2,
                                             "model_type": "unigram"}})
    rc = cli.main(["train", "--config", config, "--device", "cpu"])
    one_line_error(capsys, rc, "the teacher's tokenizer differs from the student's")


def test_bench_unknown_name_lists_what_exists(capsys):
    rc = cli.main(["bench", "no-such-benchmark"])
    one_line_error(capsys, rc, "no benchmark named 'no-such-benchmark'")
