"""Trainer pieces: optimizer split, schedule, losses, overfitting with CE and with
distillation, exact resume from a checkpoint, atomic checkpoints."""

import os

import pytest
import torch

import tiny_models
from fastencdec import EncoderDecoderLM
from fastencdec.data import (
    Seq2SeqCollator,
    SpanCorruptionCollator,
)
from fastencdec.training import (
    CheckpointManager,
    StudentLoss,
    TrainConfig,
    Trainer,
    WarmupCosineSchedule,
    build_optimizer,
    enable_activation_checkpointing,
    read_metrics,
    sample_student_targets,
    split_params,
    teacher_logits_for,
    warmup_cosine_factor,
)
from tiny_models import VOCAB, stream, tiny_encdec, tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def examples(n=8, seed=0):
    return tiny_models.examples(n, seed)


def batch_of(exs):
    return Seq2SeqCollator()(exs)


# ----------------------------------------------------------------- optimizer / schedule
def test_muon_gets_hidden_matrices_adamw_the_rest():
    model = tiny_encdec()
    groups = split_params(model)
    muon = {n for n, _ in groups["muon"]}
    assert "embed.weight" in {n for n, _ in groups["adamw_decay"]}
    assert not any("embed" in n or "lm_head" in n or "norm" in n or n.endswith("bias")
                   for n in muon)
    assert "encoder.0.attn.q_proj.weight" in muon
    n_params = sum(len(g) for g in groups.values())
    assert n_params == len({id(p) for p in model.parameters()})  # tied head counted once
    opt = build_optimizer(model)
    assert [type(o).__name__ for o in opt.optimizers] == ["AdamW", "Muon"]
    assert [type(o).__name__ for o in build_optimizer(model, use_muon=False).optimizers] == [
        "AdamW"]
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(model, lr=0)


def test_warmup_cosine():
    f = [warmup_cosine_factor(s, warmup_steps=4, total_steps=14, min_ratio=0.1)
         for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupCosineSchedule(opt, warmup_steps=4, total_steps=14)
    assert opt.param_groups[0]["lr"] == 0.5
    sched.step()
    state = sched.state_dict()
    opt.param_groups[0]["lr"] = 123.0
    WarmupCosineSchedule(opt, warmup_steps=4, total_steps=14).load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 1.0


def test_train_config_errors_name_the_option():
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="rl")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="'learning_rate' \\(did you mean 'lr'\\?\\)"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="teacher"):
        Trainer(tiny_encdec(), TrainConfig(task="distill"), iter([]))


# ----------------------------------------------------------------- losses
def test_student_loss_matches_model_loss_both_architectures():
    batch = batch_of(examples(4))
    enc = tiny_encdec()
    loss, n = StudentLoss(enc)(batch)
    assert n == int((batch["labels"] != -100).sum())
    ref = enc(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
              batch["decoder_attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss, ref)
    # decoder-only: scored on exactly the target positions of pad ∘ x ∘ y
    dec = tiny_teacher()
    loss, _ = StudentLoss(dec)(batch)
    logits = teacher_logits_for(dec, batch, pad_id=0)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_distill_loss_alpha_zero_is_ce():
    batch = batch_of(examples(4))
    enc = tiny_encdec()
    teacher = teacher_logits_for(tiny_teacher(), batch, pad_id=0)
    ce, _ = StudentLoss(enc)(batch)
    mixed, _ = StudentLoss(enc, alpha=0.0)(batch, teacher)
    torch.testing.assert_close(mixed, ce, rtol=1e-5, atol=1e-6)
    kl, _ = StudentLoss(enc, alpha=1.0)(batch, teacher)
    assert kl > 0


def test_on_policy_targets_are_well_formed():
    batch = batch_of(examples(4))
    model = tiny_encdec()
    out = sample_student_targets(model, batch, max_new_tokens=5)
    labels, dec = out["labels"], out["decoder_input_ids"]
    assert labels.shape[1] <= 5 and (dec[:, 0] == 1).all()
    real = labels != -100
    assert torch.equal(real, out["decoder_attention_mask"])
    for row, mask in zip(labels, real, strict=True):
        ids = row[mask].tolist()
        assert 2 not in ids[:-1]  # nothing after the EOS is a target


def test_activation_checkpointing_same_gradients():
    batch = batch_of(examples(4))
    plain, ckpt = tiny_encdec(), tiny_encdec()
    assert enable_activation_checkpointing(ckpt) == 3
    grads = []
    for m in (plain, ckpt):
        loss, _ = StudentLoss(m)(batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)
    assert set(ckpt.state_dict()) == set(plain.state_dict())


# ----------------------------------------------------------------- training
def test_overfits_a_small_batch_with_ce(tmp_path):
    exs = examples(8)
    cfg = TrainConfig(max_steps=60, lr=1e-2, warmup_steps=5, progress=False,
                      out_dir=str(tmp_path), log_every=10)
    trainer = Trainer(tiny_encdec(), cfg, stream(exs, 8))
    history = trainer.train()
    assert history[0]["loss"] > 3.0
    assert history[-1]["loss"] < 0.3
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [10, 20, 30, 40, 50, 60]
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(logged[-1])
    trainer.save_model(tmp_path / "model")
    again = EncoderDecoderLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(again.embed.weight, trainer.student.embed.weight)


def test_distillation_alpha_one_kl_falls():
    exs = examples(8)
    cfg = TrainConfig(task="distill", alpha=1.0, temperature=2.0, max_steps=40, lr=1e-2,
                      warmup_steps=5, progress=False)
    history = Trainer(tiny_encdec(), cfg, stream(exs, 8), teacher=tiny_teacher()).train()
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]


def test_span_corruption_pretraining_runs():
    exs = [{"input_ids": list(range(5, 5 + n))} for n in (20, 25, 30, 35)]
    collate = SpanCorruptionCollator(list(range(40, 50)), eos_id=2, seed=0)
    cfg = TrainConfig(task="pretrain", max_steps=30, lr=1e-2, warmup_steps=2, progress=False)
    history = Trainer(tiny_encdec(), cfg, stream(exs, 4, collate)).train()
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]


@pytest.mark.parametrize("task", ["finetune", "distill"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, task):
    # dropout and on-policy sampling make the run depend on every RNG state
    exs = examples(24)
    base = dict(task=task, max_steps=6, grad_accum=2, lr=5e-3, warmup_steps=2, progress=False,
                save_every=3, keep_last=3, on_policy=0.5 if task == "distill" else 0.0,
                max_new_tokens=4, seed=3)
    teacher = tiny_teacher() if task == "distill" else None
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    full = Trainer(tiny_encdec(dropout=0.1), TrainConfig(**base, out_dir=full_dir),
                   stream(exs, 4), teacher=teacher).train()
    # interrupted after 3 steps ...
    Trainer(tiny_encdec(dropout=0.1), TrainConfig(**base, out_dir=part_dir),
            stream(exs, 4), teacher=teacher).train(steps=3)
    # ... and resumed by a fresh process-like setup (another init, fresh stream)
    resumed_trainer = Trainer(tiny_encdec(seed=9, dropout=0.1),
                              TrainConfig(**base, out_dir=part_dir), stream(exs, 4),
                              teacher=teacher)
    resumed = resumed_trainer.train(resume="auto")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
    full_params = torch.load(os.path.join(full_dir, "checkpoints", "step_00000006", "state.pt"),
                             weights_only=True)["model"]
    for name, value in resumed_trainer.loss_module.state_dict().items():
        assert torch.equal(value, full_params[name]), name


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, {"step": step, "w": torch.full((2,), float(step))})
    assert mgr.list_steps() == [2, 3]
    # a crash mid-save leaves a .tmp folder: ignored, the latest complete one is used
    os.makedirs(tmp_path / "step_00000004.tmp")
    (tmp_path / "step_00000004.tmp" / "state.pt").write_bytes(b"partial")
    state, rng = CheckpointManager.load(mgr.latest())
    assert state["step"] == 3 and "torch" in rng
    mgr.save(4, {"step": 4})  # the leftover is replaced
    assert mgr.latest().endswith("step_00000004")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        CheckpointManager.load(tmp_path / "nowhere")


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    cfg = TrainConfig(max_steps=2, progress=False, out_dir=str(tmp_path))
    history = Trainer(tiny_encdec(), cfg, stream(examples(8), 4)).train(resume="auto")
    assert [r["step"] for r in history] == [1, 2]
