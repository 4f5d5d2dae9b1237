"""A run's life: output_dir refusal, config-hash refusal on resume, a signal that
checkpoints and resumes exactly, one metrics row per logged step, interval means,
KL/CE parts, evaluation with best-model selection, file modes, image inputs."""

import csv
import json
import os
import signal
import stat

import pytest
import torch

from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM
from fastencdec.data import Seq2SeqCollator
from fastencdec.training import (
    CheckpointError,
    Evaluator,
    OutputDirError,
    StudentLoss,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    read_metrics,
)
from tiny_models import VOCAB, examples, stream, tiny_decoder_only, tiny_encdec

pytestmark = pytest.mark.usefixtures("one_thread")


def config(out_dir, **changes):
    base = dict(max_steps=6, lr=5e-3, warmup_steps=1, progress=False, out_dir=str(out_dir),
                save_every=3, keep_last=3, log_every=2, seed=3)
    base.update(changes)
    return TrainConfig(**base)


# ----------------------------------------------------------------- the output folder
def test_output_dir_of_another_run_is_refused(tmp_path):
    Trainer(tiny_encdec(), config(tmp_path), stream(examples())).train()
    again = Trainer(tiny_encdec(), config(tmp_path), stream(examples()))
    with pytest.raises(OutputDirError, match="not empty"):
        again.train()
    # nothing was touched by the refused run
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "latest", "step_00000003", "step_00000006"]
    fresh = Trainer(tiny_encdec(), config(tmp_path, overwrite=True, max_steps=2),
                    stream(examples()))
    fresh.train()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000002"]


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    Trainer(tiny_encdec(), config(tmp_path), stream(examples())).train(steps=3)
    changed = Trainer(tiny_encdec(), config(tmp_path, lr=1e-3), stream(examples()))
    with pytest.raises(CheckpointError, match="different configuration.*--force-resume"):
        changed.train(resume="auto")
    forced = Trainer(tiny_encdec(), config(tmp_path, lr=1e-3), stream(examples()))
    with pytest.warns(UserWarning, match="loading it anyway"):
        forced.train(resume="auto", force_resume=True)
    assert forced.step == 6
    # the forced run's checkpoints carry its own settings; a resume may change the
    # length, the logging and the saving cadence
    longer = Trainer(tiny_encdec(), config(tmp_path, lr=1e-3, max_steps=8, log_every=4,
                                           save_every=0), stream(examples()))
    longer.train(resume="auto")
    assert longer.step == 8


# ----------------------------------------------------------------- signals
def _signal_at(trainer, step, signum, times=1):
    plain = trainer.train_step

    def step_then_signal():
        record = plain()
        if record["step"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return record

    trainer.train_step = step_then_signal


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_then_resume_is_exact(tmp_path, signum):
    exs = examples(24)
    full = Trainer(tiny_encdec(dropout=0.1), config(tmp_path / "full"), stream(exs)).train()
    part = Trainer(tiny_encdec(dropout=0.1), config(tmp_path / "part"), stream(exs))
    _signal_at(part, 4, signum)
    with pytest.raises(TrainingInterrupted) as info:
        part.train()
    assert info.value.step == 4 and info.value.exit_code == 128 + signum
    assert "interrupted at step 4; resume with --resume auto" in str(info.value)
    assert part.checkpoints.latest().endswith("step_00000004")
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # restored
    resumed = Trainer(tiny_encdec(seed=9, dropout=0.1), config(tmp_path / "part"), stream(exs))
    history = resumed.train(resume="auto")
    assert [r["loss"] for r in history] == [r["loss"] for r in full[4:]]
    # one row per logged step: 2, 4 (the interrupted step) and 6; nothing twice
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == [2, 4, 6]


def test_second_signal_aborts_at_once(tmp_path):
    trainer = Trainer(tiny_encdec(), config(tmp_path), stream(examples()))
    _signal_at(trainer, 2, signal.SIGTERM, times=2)
    with pytest.raises(KeyboardInterrupt, match="second signal"):
        trainer.train()
    assert not os.path.exists(tmp_path / "checkpoints" / "step_00000002")


# ----------------------------------------------------------------- metrics
def test_metrics_rows_are_unique_after_resume(tmp_path):
    exs = examples()
    Trainer(tiny_encdec(), config(tmp_path, max_steps=8, save_every=4, log_every=1),
            stream(exs)).train(steps=6)  # checkpoint at 4, rows up to 6
    Trainer(tiny_encdec(), config(tmp_path, max_steps=8, save_every=4, log_every=1),
            stream(exs)).train(resume=str(tmp_path / "checkpoints" / "step_00000004"))
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 9))
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])


def test_logged_loss_is_the_interval_mean(tmp_path):
    trainer = Trainer(tiny_encdec(), config(tmp_path, max_steps=6, log_every=3, save_every=0),
                      stream(examples()))
    history = trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6]
    for row, chunk in zip(rows, (history[:3], history[3:]), strict=True):
        weights = [r["target_tokens"] for r in chunk]
        mean = sum(r["loss"] * w for r, w in zip(chunk, weights, strict=True)) / sum(weights)
        assert row["loss"] == pytest.approx(mean, rel=1e-9)
        assert row["grad_norm"] == pytest.approx(sum(r["grad_norm"] for r in chunk) / 3)
        assert row["steps_in_interval"] == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_train_loss"] == rows[-1]["loss"]


def test_distillation_logs_its_kl_and_ce_parts(tmp_path):
    cfg = config(tmp_path, task="distill", alpha=0.3, temperature=2.0, max_steps=2, log_every=1,
                 save_every=0)
    history = Trainer(tiny_encdec(), cfg, stream(examples()), teacher=tiny_decoder_only()).train()
    for r in history:
        assert r["loss"] == pytest.approx(0.7 * r["ce"] + 0.3 * 4.0 * r["kl"], rel=1e-5)
        assert r["kl"] > 0 and r["ce"] > 0


def test_saved_model_files_are_not_private(tmp_path):
    trainer = Trainer(tiny_encdec(), config(tmp_path, max_steps=1), stream(examples()))
    trainer.train()
    trainer.save_model(tmp_path / "model")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        mode = stat.S_IMODE(os.stat(tmp_path / "model" / name).st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


def test_default_optimizer_is_adamw_on_the_cpu(tmp_path, capsys):
    trainer = Trainer(tiny_encdec(), TrainConfig(max_steps=1, progress=True, log_every=1),
                      stream(examples()), device="cpu")
    assert [type(o).__name__ for o in trainer.optimizer.optimizers] == ["AdamW"]
    trainer.train()
    out = capsys.readouterr().out
    assert "optimizer: AdamW (the default on the CPU" in out
    assert "step 1/1" in out and "grad-norm" in out and "lr " in out
    assert "done: step 1/1" in out


# ----------------------------------------------------------------- evaluation
def test_evaluation_during_training_keeps_the_best_model(tmp_path):
    exs = examples(8)
    collate = Seq2SeqCollator()
    evaluator = Evaluator(exs[:4], collate)
    cfg = config(tmp_path, max_steps=6, eval_every=2, best_metric="loss", save_every=0,
                 lr=1e-2)
    trainer = Trainer(tiny_encdec(), cfg, stream(exs), evaluator=evaluator)
    trainer.train()
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = min(evals, key=lambda r: r["loss"])
    saved = json.loads((tmp_path / "best.json").read_text())
    assert saved["step"] == best["step"] and saved["value"] == pytest.approx(best["loss"])
    reloaded = EncoderDecoderLM.from_pretrained(tmp_path / "best_model")
    assert evaluator(reloaded)["loss"] == pytest.approx(best["loss"], rel=1e-5)
    with open(tmp_path / "eval_metrics.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [2, 4, 6]


# ----------------------------------------------------------------- image inputs
class ImageEncDec(EncoderDecoderLM):
    """An encoder-decoder whose encoder adds a projection of image features."""

    seen: list

    def encode(self, input_ids, attention_mask=None, image_pixels=None, image_crops=None):
        self.seen.append((image_pixels, image_crops))
        states = super().encode(input_ids, attention_mask)
        # images rescale the encoder output (a stand-in for image tokens)
        return states * (2.0 + image_pixels.mean().tanh()) + sum(c.mean() for c in image_crops)


class ImageDecoderOnly(DecoderOnlyLM):
    seen: list

    def hidden_states(self, input_ids, attention_mask=None, image_pixels=None, image_crops=None):
        self.seen.append(image_pixels)
        return super().hidden_states(input_ids, attention_mask) + image_pixels.mean()


def test_image_entries_reach_student_and_teacher(tmp_path, seed):
    cfg = EncDecConfig.preset("tiny").replace(vocab_size=VOCAB)
    torch.manual_seed(seed)
    student, teacher = ImageEncDec(cfg), ImageDecoderOnly(DecoderOnlyConfig.twin_of(cfg))
    student.seen, teacher.seen = [], []
    batch = Seq2SeqCollator()(examples(4, seed=seed % 1000))
    pixels = torch.randn(4, 3, 8, 8)
    crops = [torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)]
    batch.update(image_pixels=pixels, image_crops=crops)
    hidden = StudentLoss(student).target_hidden(batch)
    assert student.seen[-1][0] is pixels and student.seen[-1][1] is crops
    other = StudentLoss(student).target_hidden({**batch, "image_pixels": pixels + 1.0})
    assert (hidden - other).abs().max() > 1e-4  # the images change what the decoder sees

    class Batches:  # an endless iterator of the same batch
        def __iter__(self):
            return self

        def __next__(self):
            return batch

    trainer = Trainer(student, TrainConfig(task="distill", max_steps=1, progress=False),
                      Batches(), teacher=teacher, device="cpu")
    trainer.train()
    assert torch.equal(teacher.seen[-1], pixels)
    assert torch.equal(student.seen[-1][1][0], crops[0])  # lists of tensors are moved too


# ----------------------------------------------------------------- compile and fp16
def _compile_works() -> bool:
    """Whether torch.compile can build and run a tiny function here (a C++ compiler
    for inductor on the CPU, Triton on a GPU)."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        return bool(torch.allclose(fn(torch.ones(4)), torch.sin(torch.ones(4)) * 2 + 1))
    except Exception:  # noqa: BLE001 - any failure means: not here
        return False


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTENCDEC_TEST_COMPILE") != "1",
                    reason="compiling a training step takes minutes on a CPU: set "
                           "FASTENCDEC_TEST_COMPILE=1 to run it")
def test_compiled_training_matches_eager(tmp_path):
    if not _compile_works():
        pytest.skip("torch.compile does not work in this environment")
    exs = examples(16)
    runs = []
    for compiled in (False, True):
        cfg = TrainConfig(max_steps=3, lr=5e-3, warmup_steps=1, progress=False, seed=1,
                          compile=compiled)
        runs.append(Trainer(tiny_encdec(), cfg, stream(exs)).train())
    for eager, compiled in zip(*runs, strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4, abs=1e-5)


@pytest.mark.gpu
def test_fp16_training_with_grad_scaler_on_cuda(tmp_path):
    exs = examples(16)
    cfg = config(tmp_path, precision="fp16", max_steps=30, lr=1e-2, save_every=10,
                 log_every=10)
    trainer = Trainer(tiny_encdec(), cfg, stream(exs), device="cuda")
    assert trainer.scaler is not None and trainer.amp_dtype == torch.float16
    history = trainer.train()
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    state = torch.load(tmp_path / "checkpoints" / "step_00000030" / "state.pt",
                       weights_only=True)
    assert "grad_scaler" in state and state["grad_scaler"]["scale"] > 0


def test_fp16_and_bf16_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    for precision in ("fp16", "bf16"):
        with pytest.raises(ValueError, match=f"precision='{precision}' needs a CUDA device"):
            Trainer(tiny_encdec(), TrainConfig(precision=precision), iter([]), device="cpu")


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(tiny_encdec(), config(tmp_path, max_steps=4, log_every=2, save_every=0),
            stream(examples())).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
