#!/usr/bin/env python
"""End-to-end generation: fastencdec against CTranslate2 and transformers, and every
engine's encoder-decoder against its decoder-only twin.

What a new user would measure: ``--input-len`` tokens in, exactly ``--new-tokens``
greedy tokens out (EOS disabled), batch 1 and 8, ``--threads`` threads. Each
configuration (engine x weight format x architecture x batch) runs in a fresh process
that loads the model, warms up and generates; configurations alternate within each of
``--rounds`` rounds, so background load hits all alike. Reported: first-token latency,
total time, tokens/s, decode tokens/s (after the first token), peak RSS of the process
while serving (the high-water mark is reset once the model is loaded; the peak
including loading is kept too), and the ratios between engines and architectures.

Engines (weights are random: speed and memory do not depend on them; nothing is
downloaded):
- fastencdec ``EncoderDecoderLM`` / ``DecoderOnlyLM`` of ``--preset``; formats fp32,
  bf16 and int8 through ``fastencdec.models.quantize.to_inference`` where it exists
  (``fp32-plain`` / ``bf16-plain``: the plain module, cast with ``.to()``);
- fastencdec's torch-free runtime (``fastencdec.runtime``, ``--runtime-formats``: int8
  and bf16 by default) serving the same weights saved by ``save_inference``: the same
  kernels without torch in the process;
- with ``--peers``: CTranslate2 (int8, float32) and transformers (eager fp32) serving a
  T5 of the same dimensions (full multi-head K/V: T5 has no GQA; relative position
  buckets) and a Llama-architecture decoder-only of about the twin's size (built as
  ``MistralConfig`` without a sliding window, because CTranslate2's Llama converter
  cannot express head_dim != d_model / heads; SwiGLU with 2/3 of the hidden width so the
  MLP has the same parameters). Both are built with random weights and converted
  locally; all of it is cached under ``--cache-dir``. Missing packages: skipped, noted.

    python bench/bench_generate.py --preset mu-330m --peers      # the issue's table
    python bench/bench_generate.py --quick [--peers]             # tiny smoke run, seconds

Prints the table, the ratios and the targets (met / not met), a markdown table for
bench/README.md, and writes JSON (bench/results/generate_<device>_<stamp>.json) and a
plot next to it (``plot_generate.py`` redraws it from the JSON).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402

ENCDEC, DECONLY = "encoder_decoder", "decoder_only"
ARCHS = (ENCDEC, DECONLY)
FORMATS = ("fp32", "bf16", "int8", "fp32-plain", "bf16-plain")
RUNTIME_FORMATS = ("int8", "bf16")
RUNTIME = "fastencdec-runtime"
OURS = ("fastencdec", RUNTIME)
CT2_TYPES = ("int8", "float32")
CT2_LABEL = {"int8": "int8", "float32": "fp32", "int8_float32": "int8"}
PAPER = {"first_token_cut": 0.47, "throughput_ratio": 4.7}  # arXiv 2501.16273
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
    "fastencdec" / "bench_generate"
SEED = 0


# ========================================================================== worker side
# Runs in a fresh process per configuration; imports only what its engine needs.
def _status_mib(field: str) -> float | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_inputs(batch: int, length: int, vocab: int, seed: int = SEED) -> list[list[int]]:
    """The same random prompt rows for every engine (ids >= 3: no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


def token_names(vocab: int, specials: tuple[str, str, str]) -> list[str]:
    """Peer vocabularies: three special tokens, then ``t<id>`` (ids match fastencdec's)."""
    return list(specials) + [f"t{i}" for i in range(3, vocab)]


T5_SPECIALS = ("<pad>", "</s>", "<unk>")
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


class FastencdecEngine:
    def __init__(self, spec: dict):
        import torch

        import fastencdec

        self.torch, self.device = torch, spec["device"]
        torch.set_num_threads(spec["threads"])
        cls = fastencdec.EncoderDecoderLM if spec["arch"] == ENCDEC else fastencdec.DecoderOnlyLM
        fmt = spec["format"]
        # The parent decides once for the whole run, so that every row runs the same path.
        inference = fmt in ("fp32", "bf16", "int8") and spec.get("to_inference", True)
        if fmt == "int8" and not inference:
            raise RuntimeError("int8 needs fastencdec.models.quantize.to_inference")
        # to_inference converts a float model; the plain bf16 path loads bf16 weights.
        stored = "bf16" if fmt == "bf16-plain" or (fmt == "bf16" and not inference) else "fp32"
        model = cls.from_pretrained(Path(spec["model_dir"]) / stored, device=self.device)
        self.path = "module"
        if inference:
            to_inference = find_to_inference()
            if to_inference is None:
                raise RuntimeError("fastencdec.models.quantize.to_inference is not importable "
                                   "in this process, but the run was planned with it")
            converted = to_inference(model, fmt)
            model = model if converted is None else converted
            self.path = "fastencdec.models.quantize.to_inference"
        self.model = model.eval()
        # From the config: converted models hold packed weights that parameters() skips.
        self.params = model.config.num_parameters()

    def generate(self, rows: list[list[int]], new_tokens: int):
        torch = self.torch
        ids = torch.tensor(rows, device=self.device)
        stamps: list[float] = []
        self._sync()
        start = time.perf_counter()
        out = self.model.generate(ids, max_new_tokens=new_tokens, eos_token_id=(),
                                  streamer=lambda _tokens: stamps.append(time.perf_counter()))
        self._sync()
        end = time.perf_counter()
        return stamps[0] - start, end - start, [int(out.shape[1])] * len(rows)

    def _sync(self):
        if str(self.device).startswith("cuda"):
            self.torch.cuda.synchronize()

    def reset_device_peak(self):
        if str(self.device).startswith("cuda"):
            self.torch.cuda.reset_peak_memory_stats()

    def device_peak_mib(self):
        if str(self.device).startswith("cuda"):
            return self.torch.cuda.max_memory_allocated() / 2**20
        return None


class RuntimeEngine:
    """fastencdec.runtime: numpy and the C++ kernels, no torch imported."""

    def __init__(self, spec: dict):
        import fastencdec.runtime as rt

        self.model = rt.load(Path(spec["model_dir"]) / f"{spec['format']}-inference",
                             threads=spec["threads"])
        self.path = "fastencdec.runtime.load"
        self.params = self.model.config.num_parameters()

    def generate(self, rows: list[list[int]], new_tokens: int):
        stamps: list[float] = []
        start = time.perf_counter()
        out = self.model.generate(rows, max_new_tokens=new_tokens, eos_token_id=(),
                                  streamer=lambda _tokens: stamps.append(time.perf_counter()))
        end = time.perf_counter()
        return stamps[0] - start, end - start, [int(out.shape[1])] * len(rows)

    def reset_device_peak(self):
        pass

    def device_peak_mib(self):
        return None


def find_to_inference():
    """``fastencdec.models.quantize.to_inference`` when this installation has it."""
    try:
        from fastencdec.models import quantize
    except ImportError:
        return None
    return getattr(quantize, "to_inference", None)


class TransformersEngine:
    def __init__(self, spec: dict):
        import torch
        import transformers

        self.torch, self.device = torch, spec["device"]
        torch.set_num_threads(spec["threads"])
        cls = (transformers.T5ForConditionalGeneration if spec["arch"] == ENCDEC
               else transformers.MistralForCausalLM)
        self.model = cls.from_pretrained(Path(spec["model_dir"]) / "hf", dtype=torch.float32,
                                         attn_implementation="eager").to(self.device).eval()
        self.model.generation_config.eos_token_id = None  # never stop early
        self.model.generation_config.pad_token_id = 0
        self.encdec = spec["arch"] == ENCDEC
        self.params = sum(p.numel() for p in self.model.parameters())
        self.path = "eager"

    def generate(self, rows, new_tokens):
        torch = self.torch
        ids = torch.tensor(rows, device=self.device)
        stamps: list[float] = []

        class Streamer:  # transformers calls put() with the prompt first, then each token
            def put(self, _value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                      streamer=Streamer())
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        end = time.perf_counter()
        new = out.shape[1] - (1 if self.encdec else ids.shape[1])
        return stamps[1] - start, end - start, [int(new)] * len(rows)

    def reset_device_peak(self):
        if str(self.device).startswith("cuda"):
            self.torch.cuda.reset_peak_memory_stats()

    def device_peak_mib(self):
        if str(self.device).startswith("cuda"):
            return self.torch.cuda.max_memory_allocated() / 2**20
        return None


class CTranslate2Engine:
    def __init__(self, spec: dict):
        import ctranslate2

        device = "cuda" if str(spec["device"]).startswith("cuda") else "cpu"
        if device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            raise RuntimeError("this CTranslate2 build sees no CUDA device")
        self.encdec = spec["arch"] == ENCDEC
        kind = ctranslate2.Translator if self.encdec else ctranslate2.Generator
        model_dir = Path(spec["model_dir"]) / f"ct2-{spec['format']}"
        self.model = kind(str(model_dir), device=device, compute_type=spec["format"],
                          intra_threads=spec["threads"], inter_threads=1)
        self.params = None
        self.path = f"compute_type={spec['format']}"

    def generate(self, rows, new_tokens):
        tokens = [[f"t{i}" for i in row] for row in rows]
        stamps: list[float] = []

        def callback(_step):
            if not stamps:
                stamps.append(time.perf_counter())
            return False  # keep decoding

        start = time.perf_counter()
        if self.encdec:
            out = self.model.translate_batch(tokens, beam_size=1, max_decoding_length=new_tokens,
                                             min_decoding_length=new_tokens, callback=callback)
            counts = [len(r.hypotheses[0]) for r in out]
        else:
            out = self.model.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens,
                                            sampling_topk=1, include_prompt_in_result=False,
                                            callback=callback)
            counts = [len(r.sequences_ids[0]) for r in out]
        end = time.perf_counter()
        return stamps[0] - start, end - start, counts

    def reset_device_peak(self):
        pass

    def device_peak_mib(self):
        return None


ENGINES = {"fastencdec": FastencdecEngine, RUNTIME: RuntimeEngine,
           "transformers": TransformersEngine,
           "ctranslate2": CTranslate2Engine}


def run_worker(spec: dict) -> dict:
    """Load one engine, warm up, time ``spec["repeats"]`` generations; check that every
    row got exactly ``new_tokens`` tokens."""
    t0 = time.perf_counter()
    engine = ENGINES[spec["engine"]](spec)
    load_s = time.perf_counter() - t0
    _release_freed_memory()
    rss_ready = _status_mib("VmRSS")
    hwm_reset = _reset_peak_rss()
    engine.reset_device_peak()
    rows = make_inputs(spec["batch"], spec["input_len"], spec["vocab_size"])
    n = spec["new_tokens"]
    engine.generate(rows, min(n, spec["warmup_tokens"]))
    first, total = [], []
    for _ in range(spec["repeats"]):
        f, t, counts = engine.generate(rows, n)
        if counts != [n] * len(rows):
            raise RuntimeError(f"asked for exactly {n} new tokens per row, got {counts}")
        first.append(f)
        total.append(t)
    curve = []
    for length in spec.get("curve_lengths") or ():
        probe = make_inputs(1, length, spec["vocab_size"], seed=SEED + length)
        engine.generate(probe, 1)
        curve.append([length, min(engine.generate(probe, 1)[0] for _ in range(2))])
    serving = _status_mib("VmHWM") if hwm_reset else None
    return {"first_token_s": first, "total_s": total, "load_s": load_s, "params": engine.params,
            "path": engine.path, "rss_model_ready_mib": rss_ready,
            "peak_rss_serving_mib": serving,
            "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device_peak_mib": engine.device_peak_mib(), "first_token_curve": curve,
            "torch_imported": "torch" in sys.modules}  # RSS fairness: peers load no torch


# ==================================================================== model preparation
# Also runs in child processes (``--prepare``): building a 330M model leaves memory behind.
def t5_config_kwargs(c: dict) -> dict:
    return dict(vocab_size=c["vocab_size"], d_model=c["d_model"], d_kv=c["head_dim"],
                d_ff=c["d_ff"], num_layers=c["n_encoder_layers"],
                num_decoder_layers=c["n_decoder_layers"], num_heads=c["n_heads"],
                feed_forward_proj="gelu_new" if c["mlp"] == "gelu" else "gated-silu",
                dropout_rate=0.0, layer_norm_epsilon=c["norm_eps"], pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=True)


def llama_config_kwargs(c: dict) -> dict:
    """Decoder-only twin ``c`` as a Llama-architecture model: SwiGLU's three matrices of
    width 2/3 * d_ff hold what GELU's two of width d_ff do."""
    hidden = c["d_ff"] if c["mlp"] == "swiglu" else round(2 * c["d_ff"] / 3)
    return dict(vocab_size=c["vocab_size"], hidden_size=c["d_model"], intermediate_size=hidden,
                num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
                num_key_value_heads=c["n_kv_heads"], head_dim=c["head_dim"],
                max_position_embeddings=c["max_position_embeddings"],
                rope_theta=c["rope_theta"], rms_norm_eps=c["norm_eps"], sliding_window=None,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def prepare_fastencdec(job: dict) -> dict:
    import torch

    import fastencdec

    torch.manual_seed(SEED)
    cfg_cls, cls = ((fastencdec.EncDecConfig, fastencdec.EncoderDecoderLM) if job["arch"] == ENCDEC
                    else (fastencdec.DecoderOnlyConfig, fastencdec.DecoderOnlyLM))
    model = cls(cfg_cls.from_dict(job["config"])).eval()
    out = Path(job["dir"])
    model.save_pretrained(out / "fp32")
    model.to(torch.bfloat16).save_pretrained(out / "bf16")
    params = model.num_parameters()
    del model
    from fastencdec.models import save_inference, to_inference

    for fmt in RUNTIME_FORMATS:  # what the torch-free runtime serves
        save_inference(to_inference(cls.from_pretrained(out / "fp32"), fmt),
                       out / f"{fmt}-inference")
    return {"params": params}


def prepare_peer(job: dict) -> dict:
    """A random-weight transformers model (+ a word-level tokenizer it needs to be
    loadable and convertible), its CTranslate2 conversions, and a check that CTranslate2
    float32 and transformers pick the same greedy tokens."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    c, out = job["config"], Path(job["dir"])
    encdec = job["arch"] == ENCDEC
    torch.manual_seed(SEED)
    specials = T5_SPECIALS if encdec else LLAMA_SPECIALS
    names = token_names(c["vocab_size"], specials)
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if encdec:
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
        model = transformers.T5ForConditionalGeneration(
            transformers.T5Config(**t5_config_kwargs(c)))
    else:
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(**llama_config_kwargs(c)))
    model.eval()
    model.save_pretrained(out / "hf")
    tokenizer.save_pretrained(out / "hf")
    result = {"params": sum(p.numel() for p in model.parameters()),
              "transformers": transformers.__version__}
    try:
        import ctranslate2
    except ImportError:
        result["ctranslate2"] = None
        return result
    result["ctranslate2"] = ctranslate2.__version__
    for ct in CT2_TYPES:
        ctranslate2.converters.TransformersConverter(str(out / "hf")).convert(
            str(out / f"ct2-{ct}"), quantization=ct, force=True)
    # Same weights, same greedy tokens (a check on the conversion, on a short input).
    rows = make_inputs(1, 16, c["vocab_size"])
    ids = torch.tensor(rows)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=1)[0].tolist()
    hf = hf[1:] if encdec else hf[16:]
    engine = CTranslate2Engine({"device": "cpu", "arch": job["arch"], "model_dir": str(out),
                                "format": "float32", "threads": 1})
    tokens = [[f"t{i}" for i in rows[0]]]
    if encdec:
        ct2 = engine.model.translate_batch(tokens, beam_size=1, max_decoding_length=8,
                                           min_decoding_length=8)[0].hypotheses[0]
    else:
        ct2 = engine.model.generate_batch(tokens, max_length=8, min_length=8, sampling_topk=1,
                                          include_prompt_in_result=False)[0].sequences[0]
    result["ct2_matches_transformers"] = ct2 == [names[i] for i in hf]
    return result


def cache_dir_for(kind: str, arch: str, config: dict, root: Path) -> Path:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    key = {"kind": kind, "arch": arch, "config": config, "seed": SEED, "format": 1,
           "versions": [ver("transformers"), ver("ctranslate2")] if kind == "peer" else []}
    if kind == "fastencdec":
        key["layout"] = 2  # with the runtime's int8/bf16 saves
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{kind}-{arch}-{digest}"


def ensure_prepared(kind: str, arch: str, config: dict, root: Path, env: dict) -> dict:
    """Build (once, cached) what ``kind`` needs to serve ``arch``; returns its info."""
    target = cache_dir_for(kind, arch, config, root)
    done = target / "done.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "dir": str(target), "cached": True}
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    job = {"kind": kind, "arch": arch, "config": config, "dir": str(tmp)}
    print(f"  preparing {kind} {arch} in {target} ...", file=sys.stderr, flush=True)
    info = _child(["--prepare", json.dumps(job)], env, timeout=3600)
    (tmp / "done.json").write_text(json.dumps(info) + "\n")
    if target.exists():  # a concurrent run finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return {**info, "dir": str(target), "cached": False}


# ====================================================================== parent side
ChildFailed = harness.ChildFailed


def _child(args: list[str], env: dict, timeout: float) -> dict:
    return harness.run_child(Path(__file__).resolve(), args, env=env, timeout=timeout)


def child_env(threads: int) -> dict:
    env = harness.thread_env(threads)  # every engine gets the same thread budget
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"  # nothing is ever downloaded
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def engine_label(spec: dict) -> str:
    if spec["engine"] == "ctranslate2":
        return f"CTranslate2 {CT2_LABEL.get(spec['format'], spec['format'])}"
    if spec["engine"] == "transformers":
        return "transformers eager fp32"
    if spec["engine"] == RUNTIME:
        return f"fastencdec runtime {spec['format']}"
    return f"fastencdec {spec['format']}"


def plan(args, config_dicts: dict, notes: list[str]) -> list[dict]:
    """Every configuration to measure, in the order one round runs them."""
    engines = [("fastencdec", f) for f in args.formats]
    inference = to_inference_available()
    if args.device == "cpu" and args.runtime_formats:
        if runtime_available():
            engines += [(RUNTIME, f) for f in args.runtime_formats]
        else:
            notes.append("fastencdec.runtime is not importable here: the runtime skipped")
    if not inference:
        if "int8" in args.formats:
            notes.append("fastencdec.models.quantize.to_inference does not exist yet: "
                         "fastencdec int8 skipped")
        if {"fp32", "bf16"} & set(args.formats):
            notes.append("without to_inference, fastencdec fp32 and bf16 run the plain module "
                         "(bf16: cast with .to(torch.bfloat16))")
        engines = [(e, f) for e, f in engines if f != "int8"]
    if args.peers:
        if harness.package_version("ctranslate2") is None:
            notes.append("CTranslate2 is not installed (pip install \".[peers]\"): skipped")
        else:
            engines += [("ctranslate2", t) for t in args.ct2_types]
        if harness.package_version("transformers") is None:
            notes.append("transformers is not installed (pip install \".[peers]\"): "
                         "transformers and CTranslate2 peers skipped")
            engines = [(e, f) for e, f in engines if e in OURS]
        else:
            engines.append(("transformers", "fp32"))
    specs = []
    for batch in args.batch_sizes:
        for engine, fmt in engines:
            for arch in args.archs:
                specs.append({"engine": engine, "format": fmt, "arch": arch, "batch": batch,
                              "input_len": args.input_len, "new_tokens": args.new_tokens,
                              "threads": args.threads, "device": args.device,
                              "vocab_size": config_dicts[arch]["vocab_size"],
                              "warmup_tokens": args.warmup_tokens, "repeats": args.repeats,
                              "to_inference": inference,
                              "curve_lengths": args.first_token_curve if batch == 1 else []})
    return specs


def runtime_available() -> bool:
    try:
        import fastencdec.runtime  # noqa: F401
    except ImportError:
        return False
    return True


def to_inference_available() -> bool:
    try:
        return find_to_inference() is not None
    except Exception:  # noqa: BLE001 - a half-written module counts as absent
        return False


def aggregate(spec: dict, results: list[dict]) -> dict:
    """One row per configuration: medians over every timed generation of every round."""
    b, n = spec["batch"], spec["new_tokens"]
    first = harness.summarize([s for r in results for s in r["first_token_s"]])
    total = harness.summarize([s for r in results for s in r["total_s"]])
    decode = harness.summarize([t - f for r in results
                                for f, t in zip(r["first_token_s"], r["total_s"], strict=True)])

    def peak(key):
        values = [r[key] for r in results if r.get(key) is not None]
        return max(values) if values else None

    row = {"label": engine_label(spec), **{k: spec[k] for k in (
        "engine", "format", "arch", "batch", "input_len", "new_tokens", "threads")},
        "params": results[0]["params"], "path": results[0]["path"],
        "first_token_ms": first.median * 1e3, "total_s": total.median,
        "tokens_per_s": b * n / total.median,
        "decode_tokens_per_s": b * (n - 1) / decode.median if n > 1 and decode.median > 0
        else None,
        "peak_rss_mib": peak("peak_rss_serving_mib") or peak("peak_rss_process_mib"),
        "peak_rss_process_mib": peak("peak_rss_process_mib"),
        "rss_model_ready_mib": peak("rss_model_ready_mib"),
        "device_peak_mib": peak("device_peak_mib"),
        "load_s": harness.summarize([r["load_s"] for r in results]).median,
        "torch_imported": any(r.get("torch_imported") for r in results),
        "first_token": first.to_dict(), "total": total.to_dict(),
        "first_token_curve": results[0].get("first_token_curve") or []}
    return row


def find(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def add_ratios(rows: list[dict]) -> None:
    """End-to-end (total time) and first-token speed-ups of every row over the peers of
    the same architecture and batch (> 1: this row is faster)."""
    peers = {"ct2_int8": dict(engine="ctranslate2", format="int8"),
             "ct2_fp32": dict(engine="ctranslate2", format="float32"),
             "transformers": dict(engine="transformers")}
    for row in rows:
        for name, match in peers.items():
            peer = find(rows, arch=row["arch"], batch=row["batch"], **match)
            if peer is None or peer is row:
                continue
            row[f"x_{name}"] = peer["total_s"] / row["total_s"]
            row[f"x_{name}_first_token"] = peer["first_token_ms"] / row["first_token_ms"]


def encdec_vs_deconly(rows: list[dict]) -> list[dict]:
    """The paper's comparison, per engine, format and batch."""
    out = []
    for ed in rows:
        if ed["arch"] != ENCDEC:
            continue
        do = find(rows, arch=DECONLY, engine=ed["engine"], format=ed["format"],
                  batch=ed["batch"])
        if do is None:
            continue
        out.append({"label": ed["label"], "batch": ed["batch"],
                    "first_token_cut": 1 - ed["first_token_ms"] / do["first_token_ms"],
                    "throughput_ratio": ed["tokens_per_s"] / do["tokens_per_s"],
                    "paper_first_token_cut": PAPER["first_token_cut"],
                    "paper_throughput_ratio": PAPER["throughput_ratio"]})
    return out


def targets(rows: list[dict], args, meaningless: bool) -> list[dict]:
    """Issue 11's goals for the encoder-decoder, each marked met / not met / n/a."""
    standard = (args.preset == "mu-330m" and args.input_len == 512 and args.new_tokens == 128
                and args.threads == 2 and args.device == "cpu")
    ours = [r for r in rows if r["engine"] in OURS and r["arch"] == ENCDEC]
    out = []

    def add(goal, batch, row, value, limit, met, unit=""):
        status = "n/a" if met is None else ("met" if met else "not met")
        if met is not None and not standard:  # the goals are stated for that setting only
            status = f"n/a (not the target setting; would be {status})"
        out.append({"target": goal, "engine": row["label"] if row else None,
                    "batch": batch, "value": value, "limit": limit,
                    "unit": unit, "status": status + (" (busy machine: not evidence)"
                                                      if meaningless and met is not None else "")})

    for batch, goal, key, limit, better in (
            (1, "batch 1 first token <= 400 ms (fastest format)", "first_token_ms", 400, min),
            (1, "batch 1, 128 tokens <= 2.5 s (fastest format)", "total_s", 2.5, min),
            (8, "batch 8 >= 130 tokens/s (fastest format)", "tokens_per_s", 130, max)):
        cands = [r for r in ours if r["batch"] == batch]
        best = better(cands, key=lambda r: r[key]) if cands else None
        met = None if best is None else (
            best[key] <= limit if better is min else best[key] >= limit)
        add(goal, batch, best, best[key] if best else None, limit, met)
    for fmt, peer_key, limit, goal in (
            ("int8", "x_ct2_int8", 1.2, "int8 >= 1.2x CTranslate2 int8 end to end"),
            ("bf16", "x_ct2_fp32", 1.5, "bf16 >= 1.5x CTranslate2 fp32 end to end"),
            ("fp32", "x_transformers", 1.0, "fp32 >= transformers eager fp32 end to end")):
        for batch in args.batch_sizes:
            for engine in OURS:
                row = find(ours, engine=engine, format=fmt, batch=batch)
                if row is None and engine != "fastencdec":
                    continue
                value = row.get(peer_key) if row else None
                add(goal, batch, row, value, limit, None if value is None else value >= limit,
                    "x")
    for fmt, peer_fmt in (("int8", "int8"), ("fp32", "float32")):
        for batch in args.batch_sizes:
            peer = find(rows, engine="ctranslate2", format=peer_fmt, arch=ENCDEC, batch=batch)
            for engine in OURS:
                row = find(ours, engine=engine, format=fmt, batch=batch)
                if row is None and engine != "fastencdec":
                    continue
                ok = (None if not (row and peer and row["peak_rss_mib"] and peer["peak_rss_mib"])
                      else row["peak_rss_mib"] <= 1.2 * peer["peak_rss_mib"])
                add(f"{fmt} peak RSS <= CTranslate2 {CT2_LABEL[peer_fmt]} + 20%", batch, row,
                    row["peak_rss_mib"] if row else None,
                    1.2 * peer["peak_rss_mib"] if peer and peer["peak_rss_mib"] else None, ok,
                    "MiB")
    return out


# -- printing -------------------------------------------------------------------------------
def _x(value) -> str:
    return f"{value:.2f}x"


MAIN_COLUMNS = [
    harness.Column("label", "engine"), harness.Column("arch", "arch"),
    harness.Column("batch", "B"), harness.Column("first_token_ms", "1st tok ms", ".0f"),
    harness.Column("total_s", "total s", ".2f"), harness.Column("tokens_per_s", "tok/s", ".1f"),
    harness.Column("decode_tokens_per_s", "decode tok/s", ".1f"),
    harness.Column("peak_rss_mib", "peak RSS MiB", ".0f"),
    harness.Column("x_ct2_int8", "x CT2 int8", _x), harness.Column("x_ct2_fp32", "x CT2 fp32", _x),
    harness.Column("x_transformers", "x transformers", _x)]


def readme_table(rows: list[dict], arch: str, batches: list[int]) -> str:
    """Issue-style markdown: one row per engine, batch-1 detail plus other batches' tok/s."""
    first_b = batches[0]
    engines = []
    for r in rows:
        if r["arch"] == arch and r["label"] not in engines:
            engines.append(r["label"])
    flat = []
    for label in engines:
        line = {"label": label}
        for r in rows:
            if r["arch"] == arch and r["label"] == label:
                b = r["batch"]
                line.update({f"{k}{b}": r[k] for k in ("first_token_ms", "total_s",
                                                         "tokens_per_s", "decode_tokens_per_s",
                                                         "peak_rss_mib")})
        flat.append(line)
    cols = [harness.Column("label", f"engine ({arch.replace('_', '-')})"),
            harness.Column(f"first_token_ms{first_b}", f"B{first_b} first token",
                           lambda v: f"{v:.0f} ms"),
            harness.Column(f"total_s{first_b}", f"B{first_b} total", lambda v: f"{v:.2f} s"),
            harness.Column(f"tokens_per_s{first_b}", f"B{first_b} tok/s", ".1f"),
            harness.Column(f"decode_tokens_per_s{first_b}", f"B{first_b} decode tok/s", ".1f")]
    cols += [harness.Column(f"tokens_per_s{b}", f"B{b} tok/s", ".1f") for b in batches[1:]]
    cols.append(harness.Column(f"peak_rss_mib{first_b}", f"B{first_b} peak RSS",
                               lambda v: f"{v:.0f} MiB"))
    return harness.format_table(flat, cols, markdown=True)


def print_report(record: dict, batches: list[int]) -> None:
    rows = record["rows"]
    gpu_col = [harness.Column("device_peak_mib", "GPU peak MiB", ".0f")] if any(
        r.get("device_peak_mib") for r in rows) else []
    print(harness.format_table(rows, MAIN_COLUMNS + gpu_col))
    print("\nx <peer> = the peer's total time / this row's (> 1: faster than the peer), same "
          "architecture and batch")
    if record["encdec_vs_deconly"]:
        print("\nencoder-decoder vs decoder-only (paper: 47% first-token cut, 4.7x throughput):")
        print(harness.format_table(record["encdec_vs_deconly"], [
            harness.Column("label", "engine"), harness.Column("batch", "B"),
            harness.Column("first_token_cut", "first-token cut", lambda v: f"{100 * v:.0f}%"),
            harness.Column("throughput_ratio", "throughput", _x)]))
    if record["targets"]:
        print("\ntargets (issue 11):")
        print(harness.format_table(record["targets"], [
            harness.Column("target", "target"), harness.Column("engine", "engine"),
            harness.Column("batch", "B"),
            harness.Column("value", "value", lambda v: f"{v:.4g}"),
            harness.Column("limit", "limit", lambda v: f"{v:.4g}"),
            harness.Column("status", "status")]))
    for note in record["notes"]:
        print(f"note: {note}")
    for err in record["errors"]:
        print(f"failed: {err['label']} {err['arch']} B{err['batch']}: {err['error']}")
    print("\nmarkdown for bench/README.md:\n")
    for arch in ARCHS:
        if any(r["arch"] == arch for r in rows):
            print(readme_table(rows, arch, batches) + "\n")


# -- main -----------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="fastencdec preset (default mu-330m; "
                   "tiny with --quick)")
    p.add_argument("--peers", action="store_true", help="also CTranslate2 and transformers")
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, 32 tokens in, 8 out, batch 1 and 2, one round (a smoke "
                        "run: its numbers mean nothing)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when present (fastencdec bf16, batch 1 8 32), else cpu")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=None,
                   help="fastencdec weight formats (default fp32 bf16 int8)")
    p.add_argument("--runtime-formats", nargs="*", choices=RUNTIME_FORMATS, default=None,
                   help="formats of fastencdec's torch-free runtime (default int8 bf16 on the "
                        "CPU, none with --quick; none: leave it out)")
    p.add_argument("--ct2-types", nargs="+", choices=("int8", "float32", "int8_float32"),
                   default=list(CT2_TYPES))
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--rounds", type=int, default=None,
                   help="fresh processes per configuration, alternating (default 3; 1 quick)")
    p.add_argument("--repeats", type=int, default=1, help="timed generations per process")
    p.add_argument("--warmup-tokens", type=int, default=2,
                   help="new tokens of the untimed warm-up generation")
    p.add_argument("--first-token-curve", type=int, nargs="*", default=[],
                   help="also batch-1 first-token latency at these input lengths")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="random-weight models and peer conversions (reused between runs)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (must not exist)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.preset = args.preset or ("tiny" if q else "mu-330m")
    if args.worker or args.prepare:
        return args, p  # a measurement process: its job says everything (and no torch here)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.batch_sizes = args.batch_sizes or ([1, 2] if q else [1, 8, 32] if gpu else [1, 8])
    args.input_len = args.input_len or (32 if q else 512)
    args.new_tokens = args.new_tokens or (8 if q else 128)
    args.rounds = args.rounds or (1 if q else 3)
    if args.runtime_formats is None:
        args.runtime_formats = [] if gpu or q else list(RUNTIME_FORMATS)
    # On a GPU the plain module runs (to_inference targets the CPU).
    args.formats = args.formats or (["bf16-plain"] if gpu else ["fp32", "bf16"] if q
                                    else ["fp32", "bf16", "int8"])
    for name in ("threads", "input_len", "new_tokens", "rounds", "repeats", "warmup_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for value in args.batch_sizes + args.first_token_curve:
        if value < 1:
            p.error(f"batch sizes and curve lengths must be >= 1, got {value}")
    if args.out is not None and args.out.exists():
        p.error(f"--out {args.out} exists; results are never overwritten")
    return args, p


def measure_all(runnable: list[dict], args, env: dict, errors: list[dict]):
    """Every configuration once per round, each in a fresh process, a different one
    leading each round. Ctrl-C or SIGTERM stops measuring; what was measured is kept."""
    results: dict[int, list[dict]] = {i: [] for i in range(len(runnable))}

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for rnd in range(args.rounds):
            shift = rnd % max(1, len(runnable))
            order = list(range(len(runnable)))
            for i in order[shift:] + order[:shift]:
                spec = runnable[i]
                what = f"[{rnd + 1}/{args.rounds}] {engine_label(spec)} {spec['arch']} " \
                       f"B{spec['batch']}"
                try:
                    res = _child(["--worker", json.dumps(spec)], env, timeout=args.timeout)
                except ChildFailed as err:
                    errors.append({"label": engine_label(spec), "arch": spec["arch"],
                                   "batch": spec["batch"], "round": rnd, "error": str(err)})
                    print(f"  {what}: FAILED {err}", file=sys.stderr)
                    continue
                results[i].append(res)
                print(f"  {what}: first token {res['first_token_s'][0] * 1e3:.0f} ms, total "
                      f"{res['total_s'][0]:.2f} s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return results, True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results, False


def main(argv=None):
    args, parser = parse_args(argv)
    if args.worker or args.prepare:
        if args.result is None:
            parser.error("--worker/--prepare need --result")
        job = json.loads(args.worker or args.prepare)
        if args.worker:
            result = run_worker(job)
        else:
            result = (prepare_fastencdec if job["kind"] == "fastencdec" else prepare_peer)(job)
        args.result.write_text(json.dumps(result))
        return 0

    import fastencdec

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA device")
    ed_cfg = fastencdec.EncDecConfig.preset(args.preset).replace(dropout=0.0)
    configs = {ENCDEC: ed_cfg, DECONLY: fastencdec.DecoderOnlyConfig.twin_of(ed_cfg)}
    limit = min(ed_cfg.max_position_embeddings, configs[DECONLY].max_position_embeddings
                - args.new_tokens)
    if args.input_len > limit or max(args.first_token_curve, default=0) > limit:
        parser.error(f"input lengths must be <= {limit} for preset {args.preset!r}")
    config_dicts = {a: c.to_dict() for a, c in configs.items()}
    interpreted = (args.device == "cpu" and os.environ.get("FASTENCDEC_BACKEND") == "triton"
                   and os.environ.get("TRITON_INTERPRET") == "1")
    run = harness.Run("generate", device=args.device, threads=args.threads, out=args.out,
                      results_dir=args.results_dir, interpreted=interpreted,
                      packages=("ctranslate2", "transformers", "tokenizers"))
    notes: list[str] = []
    if args.quick:
        notes.append("--quick: tiny model, a smoke run of the benchmark itself")
    specs = plan(args, config_dicts, notes)
    env = child_env(args.threads)

    prepared, errors = {}, []
    for arch in args.archs:
        kinds = {"fastencdec"} | ({"peer"} if any(s["engine"] not in OURS and
                                                  s["arch"] == arch for s in specs) else set())
        for kind in sorted(kinds):
            try:
                prepared[(kind, arch)] = ensure_prepared(kind, arch, config_dicts[arch],
                                                         args.cache_dir, env)
            except ChildFailed as err:
                notes.append(f"could not prepare {kind} {arch}: {err}")
    for spec in specs:
        info = prepared.get(("fastencdec" if spec["engine"] in OURS else "peer",
                             spec["arch"]))
        spec["model_dir"] = info["dir"] if info else None
    runnable = [s for s in specs if s["model_dir"]]

    started = time.monotonic()
    results, interrupted = measure_all(runnable, args, env, errors)
    if interrupted:
        notes.append(f"interrupted after {time.monotonic() - started:.0f} s: partial results "
                     f"({sum(map(len, results.values()))} of {len(runnable) * args.rounds} runs)")
    rows = [aggregate(runnable[i], res) for i, res in results.items() if res]
    add_ratios(rows)
    verdict = run.verdict()
    for row in rows:
        if row["engine"] in OURS:
            row["flops_per_sequence"] = generation_flops(configs[row["arch"]], row["input_len"],
                                                         row["new_tokens"])
    record = {
        "setting": {"preset": args.preset, "input_len": args.input_len,
                    "new_tokens": args.new_tokens, "batch_sizes": args.batch_sizes,
                    "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                    "device": args.device, "greedy": True, "eos": "disabled",
                    "weights": "random (speed and memory do not depend on them)",
                    "peak_rss": "high-water mark of the serving process after the model was "
                                "loaded (peak_rss_process_mib includes loading)"},
        "configs": {a: {**config_dicts[a], "params": configs[a].num_parameters()}
                    for a in args.archs},
        "prepared": {f"{k} {a}": {kk: vv for kk, vv in v.items() if kk != "dir"}
                     for (k, a), v in prepared.items()},
        "rows": rows, "encdec_vs_deconly": encdec_vs_deconly(rows),
        "targets": targets(rows, args, verdict["numbers_mean_nothing"]),
        "notes": notes, "errors": errors, "measure_s": time.monotonic() - started}
    print()
    if verdict["numbers_mean_nothing"]:
        print(harness.banner(verdict) + "\n")
    print_report(record, args.batch_sizes)
    path = run.finish(record, verdict=verdict)
    if not args.no_plot:
        from plot_generate import plot

        print(plot(json.loads(path.read_text()), path.with_suffix(".png")))
    print(f"wrote {path}")
    return 1 if errors or not rows else 0


# -- analytic FLOPs (kept from the first version of this benchmark) ----------------------------
def _layer_matmul_params(c, cross: bool) -> int:
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attn = c.d_model * (2 * q + 2 * kv)
    mlp = (2 if c.mlp == "gelu" else 3) * c.d_model * c.d_ff
    return attn + mlp + (c.d_model * 2 * q if cross else 0)  # cross: q and out (K/V: once)


def generation_flops(c, n_in: int, n_out: int) -> int:
    """Multiply-adds x 2 for one sequence: ``n_in`` input tokens, ``n_out`` new tokens
    (the last new token is never fed back). Attention counts QK^T and PV over the keys
    each query sees; the LM head runs once per new token."""
    width = c.n_heads * c.head_dim
    lm_head = 2 * c.d_model * c.vocab_size
    if hasattr(c, "n_encoder_layers"):
        enc = c.n_encoder_layers * (2 * _layer_matmul_params(c, False) * n_in
                                    + 4 * n_in * n_in * width)
        cross_kv = c.n_decoder_layers * 2 * n_in * c.d_model * 2 * c.n_kv_heads * c.head_dim
        dec = sum(c.n_decoder_layers * (2 * _layer_matmul_params(c, True)
                                        + 4 * (t + 1) * width + 4 * n_in * width)
                  for t in range(n_out))  # BOS + n_out - 1 fed tokens
        return enc + cross_kv + dec + n_out * lm_head
    per_layer = 2 * _layer_matmul_params(c, False)
    prefill = c.n_layers * (per_layer * n_in + 4 * width * n_in * (n_in + 1) // 2)
    decode = sum(c.n_layers * (per_layer + 4 * (n_in + t + 1) * width) for t in range(n_out - 1))
    return prefill + decode + n_out * lm_head


if __name__ == "__main__":
    sys.exit(main())
