"""``fastencdec demo --vision``: the paper's multimodal result on synthetic visual QA.

1. Draw images (coloured shapes on large, mostly flat canvases; see
   :mod:`.synthetic`), cut them into any-res crops once, train a tiny word tokenizer.
2. Train, from scratch and with the same steps, data order and learning rate:
   an encoder-decoder VLM on all crops, a decoder-only VLM of the same parameter
   count on all crops, and an encoder-decoder VLM on variance-selected crops
   (base + top-k by grayscale std).
3. Report exact match for each (and the majority-answer baseline), the image tokens
   each reads, and batch-1 generation speed (first-token latency, tokens/s) of the
   two architectures; one verdict line per claim, saying so when a claim is not
   shown by this run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..argcheck import int_at_least, positive_int
from ..models import DecoderOnlyConfig, EncDecConfig
from .anyres import AnyResConfig, normalize, process_image, stack_images
from .config import VLMConfig
from .models import DecoderOnlyVLM, EncoderDecoderVLM
from .selection import select_top_k
from .synthetic import VisualQA
from .tower import VisionConfig

__all__ = ["VisionDemoSettings", "run_vision_demo"]

IGNORE = -100


@dataclass
class VisionDemoSettings:
    device: str = "cpu"
    out_dir: str = "fastencdec-vision-demo"
    seed: int = 0
    threads: int | None = 1       # tiny models: one thread is fastest on a small CPU
    n_train: int = 3000
    n_test: int = 200
    crop: int = 32
    # any-res grid (crops across, down) and the canvases drawn (in crops)
    grid: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (3, 2), (2, 3))
    canvases: tuple[tuple[int, int], ...] = ((3, 2), (2, 3), (2, 2))
    variance_k: int = 2
    # vision tower (trained from scratch) and language models
    vision_width: int = 64
    vision_layers: int = 2
    patch: int = 8
    d_model: int = 64
    n_encoder_layers: int = 2
    n_decoder_layers: int = 1
    # training
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    # generation speed
    gen_new_tokens: int = 16
    gen_repeats: int = 5

    @classmethod
    def for_mode(cls, *, quick: bool = False, device: str | None = None,
                 out_dir: str | None = None, seed: int = 0, steps: int | None = None,
                 threads: int | None = None) -> VisionDemoSettings:
        """The default takes about 3 minutes on a 2-core CPU; ``quick`` is the CI smoke
        run (well under 30 seconds)."""
        seed = int_at_least("--seed", seed, 0)
        s = cls(device=device or ("cuda" if torch.cuda.is_available() else "cpu"), seed=seed,
                out_dir=out_dir or "fastencdec-vision-demo")
        if threads is not None:
            s.threads = positive_int("--threads", threads)
        if quick:
            s.__dict__.update(n_train=96, n_test=16, steps=12, batch_size=8, gen_new_tokens=4,
                              gen_repeats=1)
        if steps is not None:
            s.steps = positive_int("--steps", steps)
        return s


# ---------------------------------------------------------------------- data
def _encode(examples, tok, anyres_all: AnyResConfig) -> list[dict]:
    """Prompt/answer ids and every crop once (uint8); selection later reuses the stds."""
    out = []
    for ex in examples:
        done = process_image(ex["image"], anyres_all)
        out.append({"source_ids": tok.encode(ex["source"]),
                    "target_ids": tok.encode(ex["target"], add_eos=True),
                    "target": ex["target"], "crops": done.crops, "stds": done.stds})
    return out


def _crops(ex: dict, k: int | None) -> np.ndarray:
    if k is None:
        return ex["crops"]
    kept = select_top_k(ex["stds"], k)
    return ex["crops"][np.concatenate([[0], 1 + kept])]


def _images(rows: list[dict], k: int | None, anyres: AnyResConfig, device):
    pixels, mask = stack_images([normalize(_crops(ex, k), anyres.mean, anyres.std)
                                 for ex in rows])
    return pixels.to(device), mask.to(device)


def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return ids, mask


def _loss(model, rows, k, anyres, device, pad_id) -> torch.Tensor:
    pixels, crop_mask = _images(rows, k, anyres, device)
    if isinstance(model, EncoderDecoderVLM):
        ids, mask = _pad([r["source_ids"] for r in rows], pad_id)
        labels, lmask = _pad([r["target_ids"] for r in rows], pad_id)
        labels = labels.masked_fill(~lmask, IGNORE)
        return model(ids.to(device), mask.to(device), labels=labels.to(device),
                     image_pixels=pixels, image_crop_mask=crop_mask).loss
    # decoder-only: prompt then answer in one sequence; only the answer is scored
    ids, mask = _pad([r["source_ids"] + r["target_ids"] for r in rows], pad_id)
    labels = ids.clone()
    for i, r in enumerate(rows):
        labels[i, :len(r["source_ids"])] = IGNORE
    labels = labels.masked_fill(~mask, IGNORE)
    return model(ids.to(device), mask.to(device), labels=labels.to(device),
                 image_pixels=pixels, image_crop_mask=crop_mask).loss


def _train(name, model, data, s: VisionDemoSettings, k, anyres, pad_id):
    """Exactly ``s.steps`` steps for every model (no wall-clock guard: the results must
    not depend on how busy the machine is)."""
    device = torch.device(s.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(s.steps // 20, 1)

    def lr_at(step):  # linear warmup, cosine to 10 %
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(s.steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    rng = np.random.default_rng(s.seed)  # the same batches, in the same order, for every model
    order = np.concatenate([rng.permutation(len(data)) for _ in range(
        s.steps * s.batch_size // len(data) + 1)])
    losses, t0 = [], time.perf_counter()
    report = max(s.steps // 4, 1)
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = s.lr * lr_at(step)
        rows = [data[i] for i in order[step * s.batch_size:(step + 1) * s.batch_size]]
        loss = _loss(model, rows, k, anyres, device, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % report == 0 or step + 1 == s.steps:
            print(f"    step {step + 1:>4}/{s.steps}  loss {losses[-1]:.4f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return losses, time.perf_counter() - t0


@torch.no_grad()
def _exact_match(model, data, k, anyres, tok, device, batch_size=64):
    hits, tokens = 0, 0
    for start in range(0, len(data), batch_size):
        rows = data[start:start + batch_size]
        pixels, crop_mask = _images(rows, k, anyres, device)
        ids, mask = _pad([r["source_ids"] for r in rows], tok.pad_id)
        out = model.generate(ids.to(device), mask.to(device), image_pixels=pixels,
                             image_crop_mask=crop_mask, max_new_tokens=4,
                             eos_token_id=tok.eos_id)
        for text, r in zip(tok.batch_decode(out.cpu()), rows, strict=True):
            hits += text.strip() == r["target"]
        tokens += int(crop_mask.sum()) * model.config.vision.tokens_per_crop
    return hits / len(data), tokens / len(data)


@torch.no_grad()
def _speed(model, row, k, anyres, tok, device, s: VisionDemoSettings) -> dict:
    """Median first-token latency (ms: tower + encoder or prefill + first step) and
    tokens/s after it, batch 1, ``gen_new_tokens`` greedy tokens (EOS ignored)."""
    pixels, crop_mask = _images([row], k, anyres, device)
    ids = torch.tensor([row["source_ids"]], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kwargs = dict(image_pixels=pixels, image_crop_mask=crop_mask, eos_token_id=())
    model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
    first, rates = [], []
    for _ in range(s.gen_repeats):
        stamps: list[float] = []
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=s.gen_new_tokens, **kwargs,
                             streamer=lambda t, _s=stamps: _s.append(time.perf_counter()))
        sync()
        t1 = time.perf_counter()
        first.append((stamps[0] - t0) * 1e3)
        rates.append((out.shape[1] - 1) / max(t1 - stamps[0], 1e-9))
    return {"first_token_ms": statistics.median(first), "tokens_per_s": statistics.median(rates)}


def _tokenizer(out_dir: str):
    from ..data import Tokenizer

    words = VisualQA.corpus()
    return Tokenizer.train(words * 20, vocab_size=64, num_sentinels=0, model_type="word",
                           save_path=os.path.join(out_dir, "tokenizer.model"))


# ---------------------------------------------------------------------- the run
def run_vision_demo(s: VisionDemoSettings) -> dict:
    t_start = time.perf_counter()
    device = torch.device(s.device)
    old_threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, device, t_start)
    finally:
        torch.set_num_threads(old_threads)


def _run(s: VisionDemoSettings, device, t_start) -> dict:
    os.makedirs(s.out_dir, exist_ok=True)
    print(f"== fastencdec vision demo on {device}"
          + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
          + f", output in {os.path.abspath(s.out_dir)}", flush=True)
    anyres = AnyResConfig(crop_size=s.crop, pinpoints=tuple((c * s.crop, r * s.crop)
                                                            for c, r in s.grid))
    task = VisualQA(cell=s.crop, canvases=s.canvases, seed=s.seed)
    tok = _tokenizer(s.out_dir)
    train_ex, test_ex = task.generate(s.n_train), task.generate(s.n_test, split="test")
    t0 = time.perf_counter()
    train, test = _encode(train_ex, tok, anyres), _encode(test_ex, tok, anyres)
    baseline = VisualQA.majority_exact_match(train_ex, test_ex)
    print(f"task: visual QA on {s.n_train} synthetic images (shapes on flat canvases of "
          f"{sorted({ex['image'].size for ex in train_ex})} px), crops of {s.crop} px cut in "
          f"{time.perf_counter() - t0:.1f}s; questions: {sorted({e['source'] for e in train_ex})}",
          flush=True)
    ex = test_ex[0]
    print(f"  e.g. Q: {ex['source']}  A: {ex['target']}", flush=True)

    vision = VisionConfig(image_size=s.crop, patch_size=s.patch, width=s.vision_width,
                          n_layers=s.vision_layers + 1, n_heads=max(s.vision_width // 32, 1),
                          mlp_dim=2 * s.vision_width, feature_layer=-2)
    text = EncDecConfig.preset("tiny").replace(
        vocab_size=tok.vocab_size, d_model=s.d_model, n_encoder_layers=s.n_encoder_layers,
        n_decoder_layers=s.n_decoder_layers, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, max_position_embeddings=256, dropout=0.0)
    enc_cfg = VLMConfig(text=text, vision=vision, anyres=anyres)
    dec_cfg = VLMConfig(text=DecoderOnlyConfig.twin_of(text), vision=vision, anyres=anyres)
    k = s.variance_k
    plan = [("encoder-decoder, all crops", EncoderDecoderVLM, enc_cfg, None),
            ("decoder-only, all crops", DecoderOnlyVLM, dec_cfg, None),
            (f"encoder-decoder, base + top-{k} crops", EncoderDecoderVLM, enc_cfg, k)]
    runs = {}
    for i, (name, cls, cfg, kk) in enumerate(plan):
        torch.manual_seed(s.seed + 1)
        model = cls(cfg).to(device)
        print(f"-- training {name} ({model.num_parameters() / 1e6:.3f}M parameters, "
              f"{s.steps} steps)", flush=True)
        losses, seconds = _train(name, model, train, s, kk, anyres, tok.pad_id)
        em, tokens = _exact_match(model, test, kk, anyres, tok, device)
        print(f"    exact match {em:.3f} reading {tokens:.0f} image tokens per image", flush=True)
        runs[name] = {"model": model, "k": kk, "em": em, "image_tokens": tokens,
                      "losses": losses, "steps": len(losses), "seconds": seconds,
                      "params": model.num_parameters()}
        model.save_pretrained(os.path.join(s.out_dir, "models", f"vlm-{i}"))
        tok.save(os.path.join(s.out_dir, "models", f"vlm-{i}", "tokenizer.model"))
    # the all-crops encoder-decoder read with selected crops, untrained for it
    full = runs[plan[0][0]]
    em_sel, tok_sel = _exact_match(full["model"], test, k, anyres, tok, device)

    # generation speed: the busiest test image, every crop, batch 1
    busiest = max(test, key=lambda r: len(r["crops"]))
    speed = {arch: _speed(runs[name]["model"], busiest, None, anyres, tok, device, s)
             for arch, name in (("encoder-decoder", plan[0][0]), ("decoder-only", plan[1][0]))}

    print()
    print(f"{'model':<42} {'params':>8} {'steps':>6} {'image tokens':>13} {'exact match':>12}")
    for name, r in runs.items():
        print(f"{name:<42} {r['params'] / 1e6:>7.3f}M {r['steps']:>6} {r['image_tokens']:>13.0f} "
              f"{r['em']:>12.3f}")
    print(f"{'encoder-decoder all crops, read top-' + str(k):<42} {'':>8} {'':>6} "
          f"{tok_sel:>13.0f} {em_sel:>12.3f}")
    print(f"{'majority answer per question':<42} {'':>8} {'':>6} {'':>13} {baseline:>12.3f}")
    print()
    n_img = len(busiest["crops"]) * vision.tokens_per_crop
    print(f"generation, batch 1, {n_img} image tokens + {len(busiest['source_ids'])} prompt "
          f"tokens, {s.gen_new_tokens} new tokens (greedy):")
    print(f"{'':<18} {'first token (ms)':>17} {'tokens/s after it':>18}")
    for arch, r in speed.items():
        print(f"{arch:<18} {r['first_token_ms']:>17.1f} {r['tokens_per_s']:>18.1f}")
    print()

    enc, dec, sel = (runs[p[0]] for p in plan)
    verdicts = []

    def verdict(claim, shown, detail):
        line = f"{'SHOWN' if shown else 'NOT SHOWN'}: {claim} ({detail})"
        verdicts.append({"claim": claim, "shown": bool(shown), "detail": detail})
        print(line)

    verdict("the encoder-decoder VLM beats the decoder-only VLM of the same size",
            enc["em"] > dec["em"] and enc["em"] > baseline,
            f"exact match {enc['em']:.3f} vs {dec['em']:.3f}, majority answer {baseline:.3f}")
    kept = sel["image_tokens"] / enc["image_tokens"]
    verdict(f"variance selection (top-{k}) keeps {kept:.0%} of the image tokens at a small cost",
            enc["em"] > baseline and enc["em"] - sel["em"] <= 0.05,
            f"exact match {sel['em']:.3f} vs {enc['em']:.3f} with all crops "
            f"({sel['em'] - enc['em']:+.3f})")
    ratio = speed["encoder-decoder"]["tokens_per_s"] / speed["decoder-only"]["tokens_per_s"]
    verdict("the encoder-decoder VLM generates faster than the decoder-only one",
            ratio > 1.0, f"{ratio:.2f}x the tokens/s; first token "
            f"{speed['encoder-decoder']['first_token_ms']:.1f} vs "
            f"{speed['decoder-only']['first_token_ms']:.1f} ms")
    if s.steps < 100:
        print("(a --quick run trains too briefly to show anything: the verdicts are expected "
              "to be NOT SHOWN)")
    summary = {"settings": asdict(s), "majority_baseline": baseline,
               "runs": {k_: {kk: vv for kk, vv in v.items() if kk != "model"}
                        for k_, v in runs.items()},
               "all_crops_model_read_selected": {"em": em_sel, "image_tokens": tok_sel},
               "speed": speed, "verdicts": verdicts,
               "seconds": time.perf_counter() - t_start}
    with open(os.path.join(s.out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, default=str)
    print(f"results: {os.path.abspath(os.path.join(s.out_dir, 'results.json'))}; models in "
          f"{os.path.abspath(os.path.join(s.out_dir, 'models'))}")
    print(f"vision demo finished in {summary['seconds']:.0f}s")
    summary["ok"] = True
    return summary
