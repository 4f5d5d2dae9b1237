"""The demo end to end in its reduced mode, and the train / generate / bench commands."""

import json
import os

import pytest

from fastencdec import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "self-check: all kernels agree" in text  # info + self-check kept at the start
    for name in ("teacher: decoder-only", "encoder-decoder, CE", "encoder-decoder, distilled",
                 "decoder-only, CE", "chance", "first token (ms)", "figure:", "verdicts:",
                 "timings, they vary run to run", "quick mode: a smoke run"):
        assert name in text
    assert text.count("shown] ") == 4  # one verdict line per claim
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"teacher: decoder-only", "encoder-decoder, CE",
                                        "encoder-decoder, distilled", "decoder-only, CE"}
    for name, run in results["accuracy"].items():
        assert 0.0 <= run["exact_match"] <= 1.0 and run["steps"] == 30
        losses = results["losses"][name]
        assert len(losses) == 30 and losses[-1] < losses[0]
    assert len(results["verdicts"]) == 4
    for r in results["timings"]["generation"].values():
        assert r["first_token_ms"] > 0 and r["tokens_per_s"] > 0
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "models" / "encoder-decoder-distilled" / "tokenizer.model").is_file()


def test_demo_is_deterministic_for_a_seed(tmp_path, capsys):
    """Same seed, same numbers: run once in one process and once with the students
    trained in a second process (the default on a multi-core CPU)."""
    from fastencdec.training.demo import DemoSettings, run_demo

    results = []
    for name, parallel in (("a", False), ("b", True)):
        s = DemoSettings.for_mode(quick=True, device="cpu", out_dir=str(tmp_path / name),
                                  seed=5, steps=4)
        s.n_test, s.gen_new_tokens, s.parallel = 12, 2, parallel
        results.append(run_demo(s))
    capsys.readouterr()
    for name, run in results[0]["accuracy"].items():  # every number, exactly
        assert run == results[1]["accuracy"][name], name
        assert results[0]["losses"][name] == results[1]["losses"][name], name
    assert [v["shown"] for v in results[0]["verdicts"][:3]] == [
        v["shown"] for v in results[1]["verdicts"][:3]]


def test_demo_verdicts_need_a_significant_difference():
    from fastencdec.training.demo_report import above_chance, beats

    a = [True] * 60 + [False] * 40
    b = [True] * 40 + [False] * 60
    shown, diff, se = beats(a, b)  # 20 wins, 0 losses out of 100
    assert shown and diff == pytest.approx(0.2) and se == pytest.approx(20 ** 0.5 / 100)
    assert not beats(a, a)[0] and not beats(b, a)[0]
    few = [True] * 3 + [False] * 97
    assert not beats(few, [False] * 100)[0]  # 3 wins: 0.03 < 2 * sqrt(3) / 100
    assert above_chance(0.6, 0.36, 300) and not above_chance(0.38, 0.36, 300)


def test_train_and_generate_commands(tmp_path, capsys):
    from fastencdec.data import SyntheticQA

    data = tmp_path / "qa.jsonl"
    task = SyntheticQA(facts=(2, 3), fillers=(0, 1))
    data.write_text("\n".join(json.dumps({"question": e["question"], "context": e["context"],
                                          "answer": e["target"]})
                              for e in task.generate(64)))
    run = {
        "task": "finetune",
        "output_dir": str(tmp_path / "run"),
        "tokenizer": {"train": {"vocab_size": 200, "num_sentinels": 2, "model_type": "bpe"}},
        "model": {"preset": "tiny"},
        "data": {"train": str(data), "format": "qa", "batch_size": 8,
                 "max_source_len": 128, "max_target_len": 8},
        "training": {"max_steps": 3, "warmup_steps": 1, "progress": False, "save_every": 2},
    }
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run))
    assert cli.main(["train", "--config", str(config), "--device", "cpu"]) == 0
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.model").is_file()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [
        "latest", "step_00000002", "step_00000003"]
    # resuming a finished run does nothing more
    run["training"]["max_steps"] = 4
    config.write_text(json.dumps(run))
    assert cli.main(["train", "--config", str(config), "--device", "cpu", "--resume",
                     "auto"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "Where does Maria live?",
                     "--context", "Maria lives in Lisbon.", "--max-new-tokens", "3",
                     "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_run_config_errors_name_the_key(tmp_path):
    from fastencdec.training.run_config import load_run_file, run_training

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": "finetune", "modle": {}}))
    with pytest.raises(ValueError, match="modle"):
        load_run_file(bad)
    with pytest.raises(ValueError, match="output_dir"):
        run_training({"task": "finetune", "data": {"train": "x"}})
    with pytest.raises(ValueError, match="'steps' \\(did you mean 'max_steps'\\?\\)"):
        run_training({"output_dir": str(tmp_path), "training": {"steps": 3}})


def _die(*args):
    os._exit(3)


def test_demo_reports_a_dead_second_process(tmp_path, monkeypatch, capsys):
    from fastencdec.training import demo

    monkeypatch.setattr(demo, "_worker", _die)  # the spawned process runs this instead
    monkeypatch.setattr(demo, "available_cores", lambda: 2)
    s = demo.DemoSettings.for_mode(quick=True, device="cpu", out_dir=str(tmp_path), steps=2)
    s.parallel, s.n_test = True, 4
    with pytest.raises(RuntimeError, match="second process ended without a result \\(exit code 3\\)"):
        demo.run_demo(s)
