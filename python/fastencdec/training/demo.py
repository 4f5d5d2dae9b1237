"""``fastencdec demo``: the whole story on a synthetic asymmetric task, no downloads.

1. Generate extractive QA examples (long passage in, one word out) in the
   reference QA prompt format; train a sentencepiece tokenizer on them.
2. Train a decoder-only teacher, then three students of equal size for the same
   number of steps on the same batches: an encoder-decoder with cross-entropy, an
   encoder-decoder distilled from the teacher (reverse KL + CE), and a decoder-only
   model with cross-entropy.
3. Report exact match for each (and the chance level), the generation speed of
   encoder-decoder vs decoder-only (first-token latency and tokens/s), one verdict
   per claim, and save a figure.

Training is fixed in steps (never in seconds), so the same seed gives the same
accuracy numbers on any machine; only the timings vary. On the CPU the demo uses
one thread unless told otherwise (its models are tiny: see ``threads.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from queue import Empty

import torch

from ..argcheck import int_at_least, positive_int
from ..data import (
    BatchStream,
    LengthBucketBatchSampler,
    Seq2SeqCollator,
    Seq2SeqEncoder,
    SyntheticQA,
    Tokenizer,
)
from .config import TrainConfig
from .demo_report import above_chance, plot_demo, verdicts
from .evaluation import exact_match_score
from .metrics import MetricsLogger
from .objective import StudentLoss
from .run_dir import public_file_modes
from .threads import available_cores, choose_threads, warn_if_oversubscribed
from .trainer import Trainer

__all__ = ["DemoSettings", "run_demo", "answer_hits", "generation_speed"]


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
    n_test: int = 300
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
    # None: as many as the decoder-only student). Four layers learn the task in 200
    # steps (exact match 1.0) at 4/5 of the cost of the 5-layer twin.
    teacher_layers: int | None = 4
    # training (fixed steps: the same on every machine). Muon (+ AdamW for embeddings,
    # norms, biases) learns this task in far fewer steps than AdamW alone (an
    # encoder-decoder: exact match 0.65 after 100 steps vs 0.04), for ~15% more time
    # per step at this size; AdamW stays the trainer's CPU default.
    optimizer: str = "muon"
    steps: int = 100
    teacher_steps: int = 200
    batch_size: int = 32
    lr: float = 6e-3
    min_lr_ratio: float = 1.0   # no decay: these runs are too short for a cosine to help
    teacher_lr: float | None = None
    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "reverse_kl"  # the paper's choice
    threads: int | None = None  # torch CPU threads (None: 1 on the CPU, these models are tiny)
    eval_points: int = 15       # held-out cross-entropy this many times per model
    # generation benchmark (a timing)
    gen_new_tokens: int = 32
    gen_repeats: int = 7
    quick: bool = False         # a smoke run: too short to learn, so nothing is judged
    parallel: bool = True       # on a CPU with 2+ cores, train two models at once

    @classmethod
    def for_mode(cls, *, quick: bool = False, size: str = "small", device: str | None = None,
                 out_dir: str | None = None, seed: int = 0, steps: int | None = None,
                 threads: int | None = None) -> DemoSettings:
        """``small`` takes about 3 minutes on 2 idle CPU cores; ``quick`` is the CI smoke
        run (well under a minute); ``medium``/``large`` are wider, longer runs for a GPU."""
        if size not in ("small", "medium", "large"):
            raise ValueError(f"--size must be 'small', 'medium' or 'large', got {size!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        threads = positive_int("--threads", threads, allow_none=True)
        seed = int_at_least("--seed", seed, 0)
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
        if quick:
            s.__dict__.update(
                quick=True, steps=30, teacher_steps=30, n_train=600, n_test=40, d_model=64,
                d_ff=128, n_heads=4, n_kv_heads=2, n_encoder_layers=2, n_decoder_layers=1,
                teacher_layers=3, gen_new_tokens=8, gen_repeats=1, batch_size=16,
                eval_points=3, parallel=False)
        if steps is not None:
            s.steps = s.teacher_steps = positive_int("--steps", steps)
        return s


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_hits(model, tokenizer, encoder: Seq2SeqEncoder, examples: list[dict], *,
                device, batch_size: int = 64, max_new_tokens: int = 8) -> list[bool]:
    """Per example: whether the greedy answer equals the target (normalised)."""
    hits = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = tokenizer.pad([encoder.source_ids(ex) for ex in chunk])
        out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id)
        for text, ex in zip(tokenizer.batch_decode(out.cpu()), chunk, strict=True):
            hits.append(bool(exact_match_score(text, ex["target"])))
    return hits


@torch.no_grad()
def generation_speed(model, input_ids: torch.Tensor, *, new_tokens: int, repeats: int = 3,
                     ) -> dict:
    """Median first-token latency (ms: encoder or prompt prefill + first step) and decode
    speed (tokens/s after the first token) over ``repeats`` greedy runs of ``new_tokens``
    tokens (EOS ignored, so every run has the same length). A timing."""
    device = input_ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first, rates = [], []
    model.generate(input_ids, max_new_tokens=2, eos_token_id=())  # warm-up
    for _ in range(repeats):
        stamps: list[float] = []
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, eos_token_id=(),
                             streamer=lambda tokens, _s=stamps: _s.append(time.perf_counter()))
        sync()
        t1 = time.perf_counter()
        first.append((stamps[0] - t0) * 1e3)
        rates.append(out.shape[0] * (out.shape[1] - 1) / max(t1 - stamps[0], 1e-9))
    return {"first_token_ms": statistics.median(first),
            "tokens_per_s": statistics.median(rates)}


@torch.no_grad()
def held_out_ce(model, batch: dict) -> float:
    """Cross-entropy per target token on a fixed batch (the model left as it was)."""
    was_training = model.training
    model.eval()
    loss, _ = StudentLoss(model)(batch)
    model.train(was_training)
    return float(loss)


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


class _Progress:
    """One bar over every model's steps (those of a second process too)."""

    def __init__(self, total: int):
        self.count = 0
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="demo", unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def step(self, name: str, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_description(name, refresh=False)
            self.bar.set_postfix({"loss": f"{loss:.3f}"}, refresh=False)
        self.advance(1)

    def advance(self, steps: int) -> None:
        if steps > 0:
            self.count += steps
            if self.bar is not None:
                self.bar.update(steps)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train(name: str, model, s: DemoSettings, data, *, steps: int, lr: float, eval_batch: dict,
           on_step, teacher=None):
    cfg = TrainConfig(task="distill" if teacher is not None else "finetune", max_steps=steps,
                      lr=lr, warmup_steps=max(steps // 20, 1), min_lr_ratio=s.min_lr_ratio,
                      alpha=s.alpha, temperature=s.temperature, divergence=s.divergence,
                      seed=s.seed, progress=False,
                      weight_decay=0.0, optimizer=s.optimizer)
    trainer = Trainer(model, cfg, data, teacher=teacher, device=s.device)
    t0 = time.perf_counter()
    losses, held_out, records = [], [(0, held_out_ce(model, eval_batch))], []
    eval_every = max(steps // max(s.eval_points, 1), 1)
    for _ in range(steps):
        record = trainer.train_step()
        losses.append(record["loss"])
        if record["step"] % eval_every == 0 or record["step"] == steps:
            record["held_out_ce"] = held_out_ce(model, eval_batch)
            held_out.append((record["step"], record["held_out_ce"]))
        records.append({"model": name, **record})
        on_step(name, record["loss"])
    model.eval()
    return losses, held_out, records, time.perf_counter() - t0


@dataclass
class _Shared:
    """What every training job needs (picklable: a second process gets a copy)."""

    settings: DemoSettings
    tokenizer_proto: bytes
    encoded: list
    test: list
    valid: list


@dataclass
class _Job:
    index: int
    name: str
    arch: str           # "encoder_decoder" | "decoder_only"
    config: object
    steps: int
    lr: float
    distill: bool


def _slug(name: str) -> str:
    return name.split(":")[0].replace(", ", "-").replace(" ", "-")


def _run_job(shared: _Shared, job: _Job, *, on_step, teacher=None) -> dict:
    """Train, score and save one model: a pure function of the seed and the job."""
    from ..models import DecoderOnlyLM, EncoderDecoderLM

    s = shared.settings
    device = torch.device(s.device)
    tok = Tokenizer(shared.tokenizer_proto)
    encoder = Seq2SeqEncoder(tok, max_source_len=384, max_target_len=8)
    collate = Seq2SeqCollator.for_tokenizer(tok)
    sampler = LengthBucketBatchSampler([len(e["input_ids"]) for e in shared.encoded],
                                       s.batch_size, seed=s.seed)
    data = BatchStream(shared.encoded, sampler, collate)  # every model: the same batches
    eval_batch = {k: v.to(device) for k, v in collate(shared.valid).items()}
    torch.manual_seed(s.seed + 1 + job.index)
    cls = {"encoder_decoder": EncoderDecoderLM, "decoder_only": DecoderOnlyLM}[job.arch]
    model = cls(job.config).to(device)
    losses, held_out, records, seconds = _train(
        job.name, model, s, data, steps=job.steps, lr=job.lr, eval_batch=eval_batch,
        on_step=on_step, teacher=teacher if job.distill else None)
    hits = answer_hits(model, tok, encoder, shared.test, device=device)
    folder = os.path.join(s.out_dir, "models", _slug(job.name))
    model.save_pretrained(folder)
    tok.save(os.path.join(folder, "tokenizer.model"))
    public_file_modes(folder)
    return {"model": model, "losses": losses, "held_out_ce": held_out, "seconds": seconds,
            "em": sum(hits) / len(hits), "hits": hits, "params": model.num_parameters(),
            "steps": len(losses), "records": records, "folder": folder}


def _worker(shared: _Shared, jobs: list, counter, results) -> None:
    """A second process: train ``jobs`` one after the other, on one thread."""
    import traceback

    torch.set_num_threads(1)

    def count(name, loss):
        with counter.get_lock():
            counter.value += 1

    for job in jobs:
        try:
            result = _run_job(shared, job, on_step=count)
        except BaseException:  # report it to the main process, which raises
            results.put(("error", job.index, traceback.format_exc()))
            return
        result.pop("model")
        results.put(("done", job.index, result))


@contextlib.contextmanager
def _main_module_hidden():
    """A spawned process re-runs the caller's main script unless it is guarded by
    ``if __name__ == "__main__"``; the worker needs nothing from it, so it is hidden
    while the process starts."""
    main = sys.modules.get("__main__")
    saved_file, saved_spec = getattr(main, "__file__", None), getattr(main, "__spec__", None)
    try:
        if saved_file is not None:
            del main.__file__
        main.__spec__ = None
        yield
    finally:
        if saved_file is not None:
            main.__file__ = saved_file
        main.__spec__ = saved_spec


def _use_second_process(s: DemoSettings) -> bool:
    # two single-threaded trainings at once use both cores of a 2-core machine; the
    # numbers do not change (each model's training depends only on its seed)
    return (s.parallel and s.device == "cpu" and torch.get_num_threads() == 1
            and available_cores() >= 2)


def _train_all(s: DemoSettings, shared: _Shared, jobs: list, progress: _Progress) -> dict:
    """The teacher and the distilled student here; the other students, which need no
    teacher, in a second process when there are spare cores."""
    from ..models import DecoderOnlyLM, EncoderDecoderLM

    background = [j for j in jobs if j.index not in (0, 2)] if _use_second_process(s) else []
    proc = counter = queue = None
    if background:
        ctx = torch.multiprocessing.get_context("spawn")
        counter, queue = ctx.Value("i", 0), ctx.Queue()
        proc = ctx.Process(target=_worker, args=(shared, background, counter, queue),
                           daemon=True)
        with _main_module_hidden():
            proc.start()
        progress.write("-- in a second process: " + ", ".join(
            f"{j.name} ({j.steps} steps)" for j in background))
    seen = [0]

    def on_step(name, loss):
        progress.step(name, loss)
        if counter is not None:
            progress.advance(counter.value - seen[0])
            seen[0] = counter.value

    runs, teacher = {}, None
    try:
        for job in (j for j in jobs if j not in background):
            progress.write(f"-- {job.name}: {job.steps} steps"
                           + (", from the teacher" if job.distill else ""))
            runs[job.index] = _run_job(shared, job, on_step=on_step, teacher=teacher)
            progress.write(f"   {job.name}: exact match {runs[job.index]['em']:.3f}")
            if job.index == 0:
                teacher = runs[job.index]["model"]
        while proc is not None and len(runs) < len(jobs):
            alive = proc.is_alive()  # read before the queue: a result sent just before
            try:                     # the process ended is still found below
                kind, index, payload = queue.get(timeout=0.5)
            except Empty:  # keep the bar moving
                progress.advance(counter.value - seen[0])
                seen[0] = counter.value
                if not alive:
                    raise RuntimeError("the demo's second process ended without a result "
                                       f"(exit code {proc.exitcode})") from None
                continue
            if kind == "error":
                raise RuntimeError(f"training {jobs[index].name} failed in the second "
                                   f"process:\n{payload}")
            cls = {"encoder_decoder": EncoderDecoderLM, "decoder_only": DecoderOnlyLM}
            payload["model"] = cls[jobs[index].arch].from_pretrained(payload["folder"],
                                                                     device=s.device)
            runs[index] = payload
            progress.write(f"   {jobs[index].name}: exact match {payload['em']:.3f}")
        progress.advance(sum(j.steps for j in jobs) - progress.count)
    finally:
        if proc is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    return {jobs[i].name: runs[i] for i in range(len(jobs))}


def run_demo(s: DemoSettings) -> dict:
    t_start = time.perf_counter()
    device = torch.device(s.device)
    threads_note = ""
    if device.type == "cpu":
        threads, why = choose_threads(s.threads if s.threads is not None else 1, device=device)
        if s.threads is None:
            why = "these models are tiny: one thread avoids synchronisation costs; --threads N"
        threads_note = f", {threads} CPU thread{'s' if threads > 1 else ''} ({why})"
        warn_if_oversubscribed(threads + (1 if _use_second_process(s) else 0))
    os.makedirs(s.out_dir, exist_ok=True)
    torch.manual_seed(s.seed)
    print(f"== fastencdec demo on {device}{threads_note}; output in {os.path.abspath(s.out_dir)}")

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
          f"answer {tgt_len:.1f} tokens (with EOS); tokenizer: {tok.vocab_size} pieces; "
          f"optimizer: {s.optimizer}; chance {chance:.3f}")
    ex = test[0]
    print(f"  e.g. Q: {ex['question']}  A: {ex['target']}  (context: {ex['context'][:70]}...)")

    # 2. teacher, then the three students (same steps, same batches)
    student_cfg, twin_cfg, teacher_cfg = _configs(s, tok)
    shared = _Shared(settings=s, tokenizer_proto=tok.model_proto, encoded=encoded, test=test,
                     valid=encoder.encode_all(task.generate(64, split="valid")))
    teacher_lr = s.teacher_lr if s.teacher_lr is not None else s.lr
    jobs = [
        _Job(0, "teacher: decoder-only", "decoder_only", teacher_cfg, s.teacher_steps,
             teacher_lr, False),
        _Job(1, "encoder-decoder, CE", "encoder_decoder", student_cfg, s.steps, s.lr, False),
        _Job(2, "encoder-decoder, distilled", "encoder_decoder", student_cfg, s.steps, s.lr,
             True),
        _Job(3, "decoder-only, CE", "decoder_only", twin_cfg, s.steps, s.lr, False),
    ]
    progress = _Progress(sum(j.steps for j in jobs))
    try:
        runs = _train_all(s, shared, jobs, progress)
    finally:
        progress.close()
    with MetricsLogger(os.path.join(s.out_dir, "metrics.jsonl"), append=False) as log:
        for run in runs.values():
            for record in run.pop("records"):
                log.log(record)

    # 3. generation speed: equal-size encoder-decoder vs decoder-only, batch 1 (a timing)
    prompt = tok.pad([encoder.source_ids(test[0])])["input_ids"].to(device)
    speed = {arch: generation_speed(runs[name]["model"], prompt, new_tokens=s.gen_new_tokens,
                                    repeats=s.gen_repeats)
             for arch, name in (("encoder-decoder", "encoder-decoder, CE"),
                                ("decoder-only", "decoder-only, CE"))}
    claims = verdicts(runs, chance, speed)
    plot = plot_demo(runs, chance, speed, os.path.join(s.out_dir, "demo.png"),
                     f"fastencdec demo: synthetic extractive QA, equal-size students "
                     f"({device.type}, seed {s.seed})")
    any_above = any(above_chance(r["em"], chance, len(r["hits"])) for r in runs.values())
    _print_report(s, runs, chance, speed, claims, prompt.shape[1], plot)
    summary = {
        "settings": asdict(s),
        "chance": chance,
        "accuracy": {k: {"exact_match": v["em"], "params": v["params"], "steps": v["steps"],
                         "final_loss": v["losses"][-1], "held_out_ce": v["held_out_ce"]}
                     for k, v in runs.items()},
        "losses": {k: v["losses"] for k, v in runs.items()},
        "verdicts": [{"claim": c, "shown": ok, "evidence": e} for c, ok, e in claims],
        "timings": {"generation": speed,
                    "train_seconds": {k: v["seconds"] for k, v in runs.items()},
                    "total_seconds": time.perf_counter() - t_start},
        "plot": plot,
        "any_model_above_chance": any_above,
    }
    with open(os.path.join(s.out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, default=str)
    print(f"results: {os.path.abspath(os.path.join(s.out_dir, 'results.json'))}; models: "
          f"{os.path.abspath(os.path.join(s.out_dir, 'models'))}")
    print(f"demo finished in {summary['timings']['total_seconds']:.0f}s (timing)")
    if s.quick:
        print("quick mode: a smoke run of the whole pipeline, far too short to learn the task; "
              "its verdicts decide nothing (run `fastencdec demo` for the real comparison)")
    elif not any_above:
        print("FAILED: no model beat chance: the demo's training did not work on this machine "
              "(more --steps may help; please report it)")
    summary["exit_code"] = 0 if (any_above or s.quick) else 1
    return summary


def _print_report(s, runs, chance, speed, claims, prompt_len, plot) -> None:
    print()
    print(f"{'model':<30} {'params':>8} {'steps':>6} {'exact match':>12}   "
          f"{'train time (timing)':>19}")
    for name, r in runs.items():
        print(f"{name:<30} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {r['em']:>12.3f}   "
              f"{r['seconds']:>18.0f}s")
    print(f"{'chance (random candidate)':<30} {'':>8} {'':>6} {chance:>12.3f}")
    print()
    print(f"generation, batch 1, {prompt_len}-token prompt, {s.gen_new_tokens} new tokens "
          "(greedy; timings, they vary run to run):")
    print(f"{'':<18} {'first token (ms)':>17} {'tokens/s after it':>18}")
    for name, r in speed.items():
        print(f"{name:<18} {r['first_token_ms']:>17.1f} {r['tokens_per_s']:>18.1f}")
    print()
    print("verdicts:")
    for claim, shown, evidence in claims:
        print(f"  [{'shown' if shown else 'NOT shown'}] {claim}: {evidence}")
    print()
    print(f"figure: {os.path.abspath(plot)}" if plot
          else "figure: not drawn (pip install matplotlib)")
