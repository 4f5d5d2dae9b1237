"""``fastencdec demo``: the whole story on a synthetic asymmetric task, no downloads.

1. Generate extractive QA examples (long passage in, one word out) in the
   reference QA prompt format; train a sentencepiece tokenizer on them.
2. Train a decoder-only teacher, then three students of equal size with the same
   budget: an encoder-decoder with cross-entropy, an encoder-decoder distilled
   from the teacher (reverse KL + CE), and a decoder-only model with cross-entropy.
3. Report exact match for each (and the chance level), the generation speed of
   encoder-decoder vs decoder-only (first-token latency and tokens/s), and save a
   plot of the loss curves.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..data import (
    BatchStream,
    LengthBucketBatchSampler,
    Seq2SeqCollator,
    Seq2SeqEncoder,
    SyntheticQA,
    Tokenizer,
)
from .config import TrainConfig
from .metrics import MetricsLogger
from .objective import StudentLoss
from .trainer import Trainer

__all__ = ["DemoSettings", "run_demo", "exact_match", "generation_speed", "plot_losses"]


@dataclass
class DemoSettings:
    device: str = "cpu"
    out_dir: str = "fastencdec-demo"
    seed: int = 0
    # the task (see fastencdec.data.SyntheticQA)
    kind: str = "places"
    facts: tuple[int, int] = (1, 3)       # distractor facts per passage
    fillers: tuple[int, int] = (0, 1)
    relations: tuple[str, ...] | None = None
    ambiguous: float = 0.0
    n_train: int = 6000
    n_test: int = 200
    vocab_size: int = 512
    # the students (the decoder-only one is sized to the encoder-decoder's parameters)
    d_model: int = 128
    n_heads: int = 16  # many small heads: the question-to-fact match is found much sooner
    n_kv_heads: int = 4
    head_dim: int = 32
    d_ff: int = 384
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    # the teacher: a decoder-only model with this many layers (widths as the students;
    # None: as many as the decoder-only student)
    teacher_layers: int | None = None
    # training
    steps: int = 300
    teacher_steps: int = 350
    batch_size: int = 32
    lr: float = 6e-3
    alpha: float = 0.5
    temperature: float = 1.0
    # wall-clock guard for slow machines: training stops early past this many seconds
    # in total (shared among the four models in proportion to their steps x cost)
    train_budget_s: float | None = 250.0
    threads: int | None = None  # torch CPU threads (None: torch's default)
    # generation benchmark
    gen_new_tokens: int = 32
    gen_repeats: int = 7

    @classmethod
    def for_mode(cls, *, quick: bool = False, size: str = "small", device: str | None = None,
                 out_dir: str | None = None, seed: int = 0, steps: int | None = None,
                 threads: int | None = None) -> DemoSettings:
        """``small`` takes about 3 minutes on a 2-core CPU (at most about 5: past
        ``train_budget_s`` training stops early); ``quick`` is the CI smoke run (< 1 minute);
        ``medium``/``large`` are wider, longer runs meant for a GPU."""
        if size not in ("small", "medium", "large"):
            raise ValueError(f"size must be 'small', 'medium' or 'large', got {size!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        s = cls(device=device, seed=seed, out_dir=out_dir or "fastencdec-demo", threads=threads)
        if size == "medium":
            s.__dict__.update(
                d_model=256, d_ff=768, n_encoder_layers=4, n_decoder_layers=2,
                teacher_layers=10, steps=1500, teacher_steps=2000, n_train=40000,
                facts=(3, 5), fillers=(1, 4), ambiguous=0.5, batch_size=64)
        elif size == "large":
            s.__dict__.update(
                d_model=512, d_ff=1536, head_dim=64, n_encoder_layers=8, n_decoder_layers=4,
                teacher_layers=16, steps=3000, teacher_steps=4000, n_train=100000,
                kind="people", facts=(3, 6), relations=("city", "job"), lr=2e-3,
                batch_size=64)
        if size != "small":
            s.train_budget_s = None  # GPU runs: no wall-clock guard
        if quick:
            s.__dict__.update(
                train_budget_s=None, steps=30, teacher_steps=30, n_train=600, n_test=40,
                d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, n_encoder_layers=2,
                n_decoder_layers=1, teacher_layers=3, gen_new_tokens=8, gen_repeats=1,
                batch_size=16)
        if steps is not None:
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            s.steps = s.teacher_steps = steps
        return s


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def exact_match(model, tokenizer, encoder: Seq2SeqEncoder, examples: list[dict], *,
                device, batch_size: int = 64, max_new_tokens: int = 8) -> float:
    """Share of examples whose greedy answer equals the target exactly."""
    hits = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = tokenizer.pad([encoder.source_ids(ex) for ex in chunk])
        out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id)
        for text, ex in zip(tokenizer.batch_decode(out.cpu()), chunk, strict=True):
            hits += text.strip() == ex["target"].strip()
    return hits / max(len(examples), 1)


@torch.no_grad()
def generation_speed(model, input_ids: torch.Tensor, *, new_tokens: int, repeats: int = 3,
                     ) -> dict:
    """Median first-token latency (ms: encoder or prompt prefill + first step) and decode
    speed (tokens/s after the first token) over ``repeats`` greedy runs of ``new_tokens``
    tokens (EOS ignored, so every run has the same length)."""
    device = input_ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first, rates = [], []
    model.generate(input_ids, max_new_tokens=2, eos_token_id=())  # warm-up
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # batch-1 decoding of a small model is latency-bound: extra threads only add
        # wake-up jitter to every tiny op
        torch.set_num_threads(1)
    try:
        for _ in range(repeats):
            stamps: list[float] = []
            sync()
            t0 = time.perf_counter()
            out = model.generate(input_ids, max_new_tokens=new_tokens, eos_token_id=(),
                                 streamer=lambda tokens, _s=stamps: _s.append(time.perf_counter()))
            sync()
            t1 = time.perf_counter()
            first.append((stamps[0] - t0) * 1e3)
            # steady decoding: the tokens after the first, per second
            rates.append(out.shape[0] * (out.shape[1] - 1) / max(t1 - stamps[0], 1e-9))
    finally:
        torch.set_num_threads(threads)
    return {"first_token_ms": statistics.median(first),
            "tokens_per_s": statistics.median(rates)}


def plot_losses(train: dict[str, list[float]], held_out: dict[str, list[tuple[int, float]]],
                path: str, title: str) -> str | None:
    """Two panels: each run's training objective per step (faint) with a moving median,
    and its held-out cross-entropy (comparable across runs: the distilled student's
    objective also holds a KL term). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, sharex=True)
    colors = [c["color"] for c in plt.rcParams["axes.prop_cycle"]]
    for (name, losses), color in zip(train.items(), colors, strict=False):
        steps = range(1, len(losses) + 1)
        left.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        window = max(len(losses) // 25, 1)  # a moving median: robust to single spikes
        smooth = [statistics.median(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        left.plot(steps, smooth, color=color, linewidth=2, label=name)
        points = held_out.get(name, [])
        right.plot([p[0] for p in points], [p[1] for p in points], color=color, linewidth=2,
                   marker="o", markersize=3, label=name)
    left.set_ylabel("training objective per target token")
    right.set_ylabel("held-out cross-entropy per target token")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- the run
def _configs(s: DemoSettings, tok: Tokenizer):
    from ..models import DecoderOnlyConfig, EncDecConfig

    student = EncDecConfig.preset("tiny").replace(
        vocab_size=tok.vocab_size, d_model=s.d_model, n_heads=s.n_heads,
        n_kv_heads=s.n_kv_heads, head_dim=s.head_dim, d_ff=s.d_ff,
        n_encoder_layers=s.n_encoder_layers, n_decoder_layers=s.n_decoder_layers,
        pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        max_position_embeddings=512, dropout=0.0)
    twin = DecoderOnlyConfig.twin_of(student)
    teacher = twin if s.teacher_layers is None else twin.replace(n_layers=s.teacher_layers)
    return student, twin, teacher


@torch.no_grad()
def held_out_ce(model, batch: dict) -> float:
    """Cross-entropy per target token on a fixed batch (the model left in eval mode)."""
    was_training = model.training
    model.eval()
    loss, _ = StudentLoss(model)(batch)
    model.train(was_training)
    return float(loss)


def _train(name: str, model, s: DemoSettings, data, *, steps: int, eval_batch: dict,
           teacher=None, log: MetricsLogger | None = None,
           max_seconds: float | None = None) -> tuple[list[float], list, float]:
    cfg = TrainConfig(task="distill" if teacher is not None else "finetune", max_steps=steps,
                      lr=s.lr, warmup_steps=max(steps // 20, 1), alpha=s.alpha,
                      temperature=s.temperature, seed=s.seed, progress=False,
                      weight_decay=0.0)
    trainer = Trainer(model, cfg, data, teacher=teacher, device=s.device)
    t0 = time.perf_counter()
    losses, held_out = [], [(0, held_out_ce(model, eval_batch))]
    report_every = max(steps // 4, 1)
    eval_every = max(steps // 30, 1)
    for _ in range(steps):
        record = trainer.train_step()
        losses.append(record["loss"])
        if record["step"] % eval_every == 0 or record["step"] == steps:
            record["held_out_ce"] = held_out_ce(model, eval_batch)
            held_out.append((record["step"], record["held_out_ce"]))
        if log is not None:
            log.log({"model": name, **record})
        if record["step"] % report_every == 0 or record["step"] == steps:
            print(f"    step {record['step']:>5}/{steps}  loss {record['loss']:.4f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            print(f"    stopped at step {record['step']}: this machine is slower than the "
                  f"demo's time budget assumes", flush=True)
            break
    model.eval()
    return losses, held_out, time.perf_counter() - t0


def run_demo(s: DemoSettings) -> dict:
    from ..models import DecoderOnlyLM, EncoderDecoderLM

    t_start = time.perf_counter()
    device = torch.device(s.device)
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    os.makedirs(s.out_dir, exist_ok=True)
    torch.manual_seed(s.seed)
    print(f"== fastencdec demo on {device}"
          + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
          + f", output in {os.path.abspath(s.out_dir)}")

    # 1. data + tokenizer
    task = SyntheticQA(kind=s.kind, facts=s.facts, fillers=s.fillers, relations=s.relations,
                       ambiguous=s.ambiguous, seed=s.seed)
    train, test = task.generate(s.n_train), task.generate(s.n_test, split="test")
    tok = Tokenizer.train(task.corpus(train[:4000]), vocab_size=s.vocab_size,
                          num_sentinels=8, model_type="bpe")
    encoder = Seq2SeqEncoder(tok, max_source_len=384, max_target_len=8)
    encoded = encoder.encode_all(train)
    src_len = sum(len(e["input_ids"]) for e in encoded) / len(encoded)
    tgt_len = sum(len(e["labels"]) for e in encoded) / len(encoded)
    chance = task.chance_exact_match(test)
    print(f"task: extractive QA, {s.n_train} training examples; input {src_len:.0f} tokens, "
          f"answer {tgt_len:.1f} tokens (with EOS); tokenizer: {tok.vocab_size} pieces")
    ex = test[0]
    print(f"  e.g. Q: {ex['question']}  A: {ex['target']}  (context: {ex['context'][:70]}...)")

    def stream(offset: int) -> BatchStream:
        lengths = [len(e["input_ids"]) for e in encoded]
        sampler = LengthBucketBatchSampler(lengths, s.batch_size, seed=s.seed + offset)
        return BatchStream(encoded, sampler, Seq2SeqCollator.for_tokenizer(tok))

    student_cfg, twin_cfg, teacher_cfg = _configs(s, tok)
    valid = encoder.encode_all(task.generate(64, split="valid"))
    eval_batch = {k: v.to(device) for k, v in Seq2SeqCollator.for_tokenizer(tok)(valid).items()}
    log = MetricsLogger(os.path.join(s.out_dir, "metrics.jsonl"), append=False)
    runs = {}

    def build(cls, cfg, seed):
        torch.manual_seed(seed)
        return cls(cfg).to(device)

    # 2. teacher, then the three students (same steps, same data order)
    plan = [
        ("teacher: decoder-only", DecoderOnlyLM, teacher_cfg, s.teacher_steps, False),
        ("encoder-decoder, CE", EncoderDecoderLM, student_cfg, s.steps, False),
        ("encoder-decoder, distilled", EncoderDecoderLM, student_cfg, s.steps, True),
        ("decoder-only, CE", DecoderOnlyLM, twin_cfg, s.steps, False),
    ]
    # relative cost of a step: a decoder-only model reads x in every layer
    cost = {DecoderOnlyLM: 2.0, EncoderDecoderLM: 1.0}
    weights = [steps * cost[cls] * (1.5 if distill else 1.0)
               for _, cls, _, steps, distill in plan]
    teacher = None
    for i, (name, cls, cfg, steps, distill) in enumerate(plan):
        model = build(cls, cfg, s.seed + 1 + i)
        print(f"-- training {name} ({model.num_parameters() / 1e6:.2f}M parameters, "
              f"{steps} steps{', from the teacher' if distill else ''})", flush=True)
        budget = (None if s.train_budget_s is None
                  else s.train_budget_s * weights[i] / sum(weights))
        losses, held_out, seconds = _train(name, model, s, stream(0), steps=steps,
                                           eval_batch=eval_batch,
                                           teacher=teacher if distill else None, log=log,
                                           max_seconds=budget)
        em = exact_match(model, tok, encoder, test, device=device)
        print(f"    exact match {em:.3f} (chance {chance:.3f})", flush=True)
        runs[name] = {"model": model, "losses": losses, "held_out_ce": held_out,
                      "seconds": seconds, "em": em, "params": model.num_parameters(),
                      "steps": len(losses)}
        if i == 0:
            teacher = model
        slug = name.split(":")[0].replace(", ", "-").replace(" ", "-")
        model.save_pretrained(os.path.join(s.out_dir, "models", slug))
        tok.save(os.path.join(s.out_dir, "models", slug, "tokenizer.model"))
    log.close()

    # 3. generation speed: equal-size encoder-decoder vs decoder-only, batch 1
    prompt = tok.pad([encoder.source_ids(test[0])])["input_ids"].to(device)
    speed = {
        "encoder-decoder": generation_speed(runs["encoder-decoder, CE"]["model"], prompt,
                                            new_tokens=s.gen_new_tokens, repeats=s.gen_repeats),
        "decoder-only": generation_speed(runs["decoder-only, CE"]["model"], prompt,
                                         new_tokens=s.gen_new_tokens, repeats=s.gen_repeats),
    }
    plot = plot_losses({k: v["losses"] for k, v in runs.items()},
                       {k: v["held_out_ce"] for k, v in runs.items()},
                       os.path.join(s.out_dir, "loss_curves.png"),
                       f"fastencdec demo: synthetic extractive QA, equal-size students "
                       f"({device.type})")

    # 4. report
    print()
    print(f"{'model':<30} {'params':>8} {'steps':>6} {'exact match':>12} {'train s':>8}")
    for name, r in runs.items():
        print(f"{name:<30} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {r['em']:>12.3f} "
              f"{r['seconds']:>8.0f}")
    print(f"{'chance (random candidate)':<30} {'':>8} {chance:>12.3f}")
    print()
    print(f"generation, batch 1, {prompt.shape[1]}-token prompt, {s.gen_new_tokens} new tokens "
          f"(greedy):")
    print(f"{'':<18} {'first token (ms)':>17} {'tokens/s after it':>18}")
    for name, r in speed.items():
        print(f"{name:<18} {r['first_token_ms']:>17.1f} {r['tokens_per_s']:>18.1f}")
    ratio = speed["encoder-decoder"]["tokens_per_s"] / speed["decoder-only"]["tokens_per_s"]
    print(f"encoder-decoder decodes {ratio:.2f}x as many tokens/s as the decoder-only model "
          "of the same size")
    print()
    if plot:
        print(f"loss curves: {os.path.abspath(plot)}")
    else:
        print("loss curves: not plotted (pip install matplotlib)")
    students = [k for k in runs if not k.startswith("teacher")]
    above = all(runs[k]["em"] > chance for k in students)
    summary = {
        "settings": asdict(s),
        "chance": chance,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in runs.items()},
        "speed": speed,
        "plot": plot,
        "seconds": time.perf_counter() - t_start,
        "students_above_chance": above,
    }
    with open(os.path.join(s.out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, default=str)
    print(f"results: {os.path.abspath(os.path.join(s.out_dir, 'results.json'))}; saved models "
          f"in {os.path.abspath(os.path.join(s.out_dir, 'models'))}")
    print(f"demo finished in {summary['seconds']:.0f}s"
          + ("" if above else "  (some student did not beat chance: try more --steps)"))
    summary["ok"] = True
    return summary
