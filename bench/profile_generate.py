#!/usr/bin/env python
"""Where generation time goes: ms per generated token split into encoder GEMMs, decoder
GEMMs (+ fused projections), the LM head, attention ops, norms/activations, other ops,
and Python/dispatch overhead; per weight format and batch size, in fresh processes.

For each configuration the worker loads the model (random weights, cached by
``bench_generate.py``), warms up, times one plain generation (no profiler: the wall
time), then profiles a second one with ``torch.profiler``. Attribution, without
touching model code:
- forward hooks on every submodule open a ``record_function`` region named after it,
  so each op is charged to the innermost module that ran it: a linear-like module under
  ``encoder.`` is an encoder GEMM, elsewhere a decoder GEMM; the LM head is the module
  named ``lm_head`` or a matmul whose output width is the vocabulary; ``*Norm`` modules
  and ops inside MLPs outside their linears are norms/activations;
- the public attention ops (``fastencdec.ops.self_attention``, ``cross_attention``,
  ``decode_attention``, ``append_kv_cache``, ``apply_rope``) are wrapped in regions
  for the run, and ``fastencdec::*`` custom-op events count too: C++ kernels called
  through pybind11 are invisible to the profiler, the region around them is not;
  likewise the int8 and bf16 GEMM kernels (``models.quantize._int8_linear``,
  ``_bf16_linear``) get a region, charged like a matmul op to the module that called
  it; an int8/bf16 model's one-call C++ decode step (``models.decoder_step.run``) and
  one-call C++ encoder or decoder-only prompt (``models.encoder_pass.run``,
  ``models.decoder_prefill.run``) are categories of their own, whose
  inside the profiler cannot split (``--module-path`` profiles the same model module by
  module instead);
- an op is counted once, at its outermost level (nested aten calls belong to it);
- overhead = the unprofiled wall time minus all counted op time: Python, dispatch,
  hooks of the model itself, allocation between ops.

The prefill (encoder, cross-attention K/V, the first decoder step) and the decode
steps are reported apart: prefill in ms per input batch, decode in ms per step (one
token for each of the B rows).

    python bench/profile_generate.py [--preset mu-330m] [--formats fp32 bf16 int8]
        [--batch-sizes 1 8] [--new-tokens 32] [--threads 2] [--quick] [--module-path]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402
import bench_generate as bg  # noqa: E402

CATEGORIES = ("C++ encoder/prompt", "C++ decode step", "encoder GEMMs", "decoder GEMMs", "LM head",
              "attention ops",
              "norms/activations", "other ops", "overhead")
WRAPPED_OPS = ("self_attention", "cross_attention", "decode_attention", "append_kv_cache",
               "apply_rope")
WRAPPED_GEMMS = ("_int8_linear", "_bf16_linear")  # models.quantize's C++ GEMM entry points
LABEL = "fed::"
STEP = f"{LABEL}step::decoder"  # models.decoder_step.run: a whole int8/bf16 decode step in C++
# models.encoder_pass.run / decoder_prefill.run: a whole int8/bf16 encoder or decoder-only
# prompt in C++
ENCODER = f"{LABEL}step::encoder"
MATMUL_RE = re.compile(r"linear|addmm|(^|::)mm$|matmul|bmm|int8pack|_int_mm|gemm|qlinear")


# ============================================================================ worker
class Attribution:
    """Labels the profiler sees: module regions, op regions and phase regions."""

    def __init__(self, model, torch):
        self.torch, self.model = torch, model
        self.handles, self.stack = [], []
        self.calls = defaultdict(int)
        self.originals, self.gemm_originals, self.step_original = {}, {}, None
        self.encoder_original = None
        self.kinds = {}  # module label -> "linear" | "norm" | "mlp" | "attention" | "other"

    def install(self):
        try:
            from fastencdec.models import decoder_prefill, decoder_step, encoder_pass, packed_plan
        except ImportError:  # an older tree: no one-call encoder / prompt
            one_call, replaced = None, set()
        else:
            one_call = (encoder_pass if getattr(self.model, "is_encoder_decoder", False)
                        else decoder_prefill)
            if one_call.plan(self.model) is None:
                one_call = None
            decoder_step.step_plan(self.model)
            # The one-call paths run only while no hook watches the modules they
            # replace: leave those unhooked and time each call as a whole.
            replaced = {id(m) for kind in ("encoder", "prefill", "decoder_step")
                        for m in packed_plan.replaced_modules(self.model, kind)}
        for name, module in self.model.named_modules():
            if not name or id(module) in replaced:
                continue
            label = f"{LABEL}mod::{name}"
            self.kinds[label] = module_kind(name, module)
            self.handles.append(module.register_forward_pre_hook(self._enter(label)))
            self.handles.append(module.register_forward_hook(self._exit))
        from fastencdec import ops

        for op in WRAPPED_OPS:
            if hasattr(ops, op):
                self.originals[op] = getattr(ops, op)
                setattr(ops, op, self._wrap(op, self.originals[op]))
        # GEMM kernels called through pybind11 (invisible to the profiler otherwise)
        from fastencdec.models import quantize

        for attr in WRAPPED_GEMMS:
            fn = getattr(quantize, attr, None)
            if fn is not None:
                self.gemm_originals[attr] = fn
                setattr(quantize, attr, self._wrap(attr, fn, f"{LABEL}gemm::{attr}"))
        try:
            from fastencdec.models import decoder_step
        except ImportError:  # an older tree: no C++ decode step
            decoder_step = None
        if decoder_step is not None:
            self.step_original = decoder_step.run
            decoder_step.run = self._wrap("decoder_step", decoder_step.run, STEP)
        if one_call is not None:
            self.encoder_original = (one_call, one_call.run)
            one_call.run = self._wrap("encoder", one_call.run, ENCODER)

    def remove(self):
        for h in self.handles:
            h.remove()
        from fastencdec import ops
        from fastencdec.models import quantize

        for op, fn in self.originals.items():
            setattr(ops, op, fn)
        for attr, fn in self.gemm_originals.items():
            setattr(quantize, attr, fn)
        if self.step_original is not None:
            from fastencdec.models import decoder_step

            decoder_step.run = self.step_original
        if self.encoder_original is not None:
            module, fn = self.encoder_original
            module.run = fn

    def _enter(self, label):
        def hook(_module, _args):
            region = self.torch.profiler.record_function(label)
            region.__enter__()
            self.stack.append(region)
        return hook

    def _exit(self, _module, _args, _out):
        self.stack.pop().__exit__(None, None, None)

    def _wrap(self, op, fn, label=None):
        label = label or f"{LABEL}op::{op}"

        def wrapped(*args, **kwargs):
            self.calls[op] += 1
            with self.torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return wrapped


def module_kind(name: str, module) -> str:
    cls = type(module).__name__.lower()
    weight = getattr(module, "weight", None)
    if name.split(".")[-1] == "lm_head" or "linear" in cls or (
            weight is not None and getattr(weight, "ndim", 0) == 2 and "embed" not in cls
            and not any(True for _ in module.children())):
        return "linear"
    if "norm" in cls:
        return "norm"
    if "mlp" in cls or "glu" in cls or "mlp" in name.split(".")[-1]:
        return "mlp"
    if "attention" in cls or "attn" in name.split(".")[-1]:
        return "attention"
    return "other"


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _is_lm_head_shape(event, vocab: int) -> bool:
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, list | tuple) and len(s) == 2]
    return any(vocab in s for s in shapes)


def classify(event, kinds: dict, vocab: int, encdec: bool) -> str | None:
    """The category of one top-level event, or None when it is nested in another op."""
    module_label, op_label = None, None
    for anc in _ancestors(event):
        name = anc.name
        if not name.startswith(LABEL):
            return None  # an op inside another op: counted with it
        if name.startswith(f"{LABEL}op::") and op_label is None:
            op_label = name
        if name.startswith(f"{LABEL}mod::") and module_label is None:
            module_label = name
    name = event.name
    if name == STEP:
        return "C++ decode step"
    if name == ENCODER:
        return "C++ encoder/prompt"
    if name.startswith(f"{LABEL}gemm::"):
        name = "gemm"  # a C++ GEMM: charged like a matmul op to its module
    elif op_label is not None or name.startswith("fastencdec::") or "attention" in name:
        return "attention ops"
    kind = kinds.get(module_label, "other") if module_label else "none"
    qual = module_label[len(f"{LABEL}mod::"):] if module_label else ""
    if MATMUL_RE.search(name):
        if qual.split(".")[-1] == "lm_head" or _is_lm_head_shape(event, vocab):
            return "LM head"
        if encdec and qual.startswith("encoder"):
            return "encoder GEMMs"
        if qual:
            return "decoder GEMMs"
        return "other ops"
    if kind in ("norm", "mlp") or "norm" in name:
        return "norms/activations"
    if kind == "attention":
        return "attention ops"
    return "other ops"


def _region(torch, label):
    region = torch.profiler.record_function(label)
    region.__enter__()
    return region


def profile_worker(spec: dict) -> dict:
    import torch

    if not spec.get("cpp_step", True):  # the module path: every op profiled on its own
        from fastencdec.models import decoder_step

        decoder_step.step_plan = lambda model: None
        try:
            from fastencdec.models import decoder_prefill, encoder_pass
        except ImportError:
            pass
        else:
            encoder_pass.plan = decoder_prefill.plan = lambda model: None
    engine = bg.FastencdecEngine(spec)
    model, vocab = engine.model, engine.model.config.vocab_size
    encdec = spec["arch"] == bg.ENCDEC
    rows = torch.tensor(bg.make_inputs(spec["batch"], spec["input_len"], spec["vocab_size"]))
    n = spec["new_tokens"]

    def generate(streamer):
        return model.generate(rows, max_new_tokens=n, eos_token_id=(), streamer=streamer)

    generate(None)  # warm-up at full length
    walls = []
    for _ in range(spec["repeats"]):  # the wall time: no profiler, no hooks
        stamps = []
        start = time.perf_counter()
        generate(lambda _t, s=stamps: s.append(time.perf_counter()))
        walls.append((stamps[0] - start, time.perf_counter() - stamps[0]))
    wall = {"prefill": harness.summarize([w[0] for w in walls]).median,
            "decode": harness.summarize([w[1] for w in walls]).median}

    attribution = Attribution(model, torch)
    attribution.install()
    phase = {"region": None}

    def streamer(_tokens):
        if phase["region"] is not None and phase["name"] == "prefill":
            phase["region"].__exit__(None, None, None)
            phase.update(region=_region(torch, f"{LABEL}phase::decode"), name="decode")

    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            phase.update(region=_region(torch, f"{LABEL}phase::prefill"), name="prefill")
            generate(streamer)
            phase["region"].__exit__(None, None, None)
    finally:
        attribution.remove()
    events = prof.events()
    spans, ms = {}, {p: defaultdict(float) for p in ("prefill", "decode")}
    for ev in events:
        if ev.name.startswith(f"{LABEL}phase::"):
            spans[ev.name.split("::")[-1]] = (ev.time_range.start, ev.time_range.end)
    top_ops = defaultdict(float)
    for ev in events:
        if ev.name.startswith(f"{LABEL}mod::") or ev.name.startswith(f"{LABEL}phase::"):
            continue
        if ev.name.startswith(f"{LABEL}op::"):
            if any(a.name.startswith(f"{LABEL}op::") for a in _ancestors(ev)):
                continue
            category = "attention ops"
        else:
            category = classify(ev, attribution.kinds, vocab, encdec)
            if category is None:
                continue
        where = next((p for p, (a, b) in spans.items()
                      if a <= ev.time_range.start and ev.time_range.end <= b), None)
        if where is None:
            continue
        seconds = (ev.time_range.end - ev.time_range.start) / 1e6
        ms[where][category] += seconds * 1e3
        if where == "decode":
            top_ops[f"{category}: {ev.name}"] += seconds * 1e3
    steps = {"prefill": 1, "decode": max(1, n - 1)}
    result = {"wall_ms": {p: wall[p] * 1e3 / steps[p] for p in wall},
              "profiled_wall_ms": {p: (b - a) / 1e3 / steps[p] for p, (a, b) in spans.items()},
              "op_calls": dict(attribution.calls), "path": engine.path}
    for p in ("prefill", "decode"):
        cats = {c: ms[p].get(c, 0.0) / steps[p] for c in CATEGORIES if c != "overhead"}
        cats["overhead"] = max(0.0, result["wall_ms"][p] - sum(cats.values()))
        result[p] = cats
        result[f"{p}_overhead_in_profiled_run_ms"] = result["profiled_wall_ms"].get(p, 0.0) - sum(
            v for c, v in cats.items() if c != "overhead")
    result["top_decode_ops_ms_per_step"] = dict(
        sorted(((k, v / steps["decode"]) for k, v in top_ops.items()), key=lambda kv: -kv[1])[:12])
    return result


# ============================================================================ parent
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="default mu-330m (tiny with --quick)")
    p.add_argument("--arch", choices=bg.ARCHS, default=bg.ENCDEC)
    p.add_argument("--formats", nargs="+", choices=bg.FORMATS, default=None,
                   help="default fp32 bf16 int8 (int8 only where to_inference exists)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None,
                   help="decode steps profiled (default 32; steps cost about the same)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None,
                   help="unprofiled generations whose median is the wall time (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny preset, a smoke run")
    p.add_argument("--module-path", action="store_true",
                   help="int8/bf16: encode/prefill and decode module by module instead "
                        "of the one-call C++ encoder/prompt and step (whose inside the "
                        "profiler cannot split)")
    p.add_argument("--cache-dir", type=Path, default=bg.DEFAULT_CACHE)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.preset = args.preset or ("tiny" if q else "mu-330m")
    args.batch_sizes = args.batch_sizes or ([1, 2] if q else [1, 8])
    args.input_len = args.input_len or (32 if q else 512)
    args.new_tokens = args.new_tokens or (8 if q else 32)
    args.formats = args.formats or (["fp32", "bf16"] if q else ["fp32", "bf16", "int8"])
    args.repeats = args.repeats or (1 if q else 3)
    for name, least in (("threads", 1), ("input_len", 1), ("new_tokens", 2), ("repeats", 1)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    if args.out is not None and args.out.exists():
        p.error(f"--out {args.out} exists; results are never overwritten")
    return args, p


def print_tables(rows: list[dict]) -> None:
    cols = [harness.Column("format", "format"), harness.Column("batch", "B")]
    cols += [harness.Column(c, c, ".2f") for c in CATEGORIES]
    for phase, unit in (("decode", "ms per decode step (one token for each of the B rows)"),
                        ("prefill", "ms per input batch (encoder + cross K/V + first step)")):
        flat = [{"format": r["format"], "batch": r["batch"], **r[phase],
                 "wall": r["wall_ms"][phase], "profiled": r["profiled_wall_ms"].get(phase)}
                for r in rows]
        print(f"\n{phase}: {unit}")
        print(harness.format_table(flat, cols + [harness.Column("wall", "wall", ".2f"),
                                                 harness.Column("profiled", "wall profiled",
                                                                ".2f")]))
    print("\nmarkdown (decode, ms per step):\n")
    md = [{"format": r["format"], "batch": r["batch"], **r["decode"],
           "wall": r["wall_ms"]["decode"]} for r in rows]
    print(harness.format_table(md, cols + [harness.Column("wall", "total", ".2f")],
                               markdown=True))


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    if args.worker:
        if args.result is None:
            parser.error("--worker needs --result")
        args.result.write_text(json.dumps(profile_worker(json.loads(args.worker))))
        return 0
    import fastencdec

    ed = fastencdec.EncDecConfig.preset(args.preset).replace(dropout=0.0)
    config = ed if args.arch == bg.ENCDEC else fastencdec.DecoderOnlyConfig.twin_of(ed)
    notes = []
    formats = list(args.formats)
    if "int8" in formats and not bg.to_inference_available():
        formats.remove("int8")
        notes.append("fastencdec.models.quantize.to_inference does not exist yet: int8 skipped")
    run = harness.Run("profile_generate", threads=args.threads, out=args.out,
                      results_dir=args.results_dir, interpreted=False)
    env = bg.child_env(args.threads)
    prepared = bg.ensure_prepared("fastencdec", args.arch, config.to_dict(), args.cache_dir, env)
    rows, errors = [], []
    for fmt in formats:
        for batch in args.batch_sizes:
            spec = {"engine": "fastencdec", "format": fmt, "arch": args.arch, "batch": batch,
                    "input_len": args.input_len, "new_tokens": args.new_tokens,
                    "threads": args.threads, "device": "cpu", "vocab_size": config.vocab_size,
                    "model_dir": prepared["dir"], "repeats": args.repeats,
                    "to_inference": bg.to_inference_available(),
                    "cpp_step": not args.module_path}
            try:
                res = harness.run_child(Path(__file__).resolve(), ["--worker", json.dumps(spec)],
                                        env=env, timeout=args.timeout)
            except harness.ChildFailed as err:
                errors.append({"format": fmt, "batch": batch, "error": str(err)})
                print(f"  {fmt} B{batch}: FAILED {err}", file=sys.stderr)
                continue
            rows.append({"format": fmt, "batch": batch, **res})
            print(f"  {fmt} B{batch}: decode {res['wall_ms']['decode']:.1f} ms/step, prefill "
                  f"{res['wall_ms']['prefill']:.0f} ms", file=sys.stderr, flush=True)
    verdict = run.verdict()
    if verdict["numbers_mean_nothing"]:
        print(harness.banner(verdict))
    if rows:
        print_tables(rows)
    for note in notes:
        print(f"note: {note}")
    for err in errors:
        print(f"failed: {err['format']} B{err['batch']}: {err['error']}")
    if rows and not any(r["op_calls"] for r in rows):
        print("note: no fastencdec.ops call was seen by the wrappers; attention time is "
              "whatever fastencdec::* events the profiler recorded")
    path = run.finish({"setting": {"preset": args.preset, "arch": args.arch,
                                   "input_len": args.input_len, "new_tokens": args.new_tokens,
                                   "threads": args.threads, "categories": list(CATEGORIES),
                                   "cpp_decode_step": not args.module_path},
                       "rows": rows, "notes": notes, "errors": errors}, verdict=verdict)
    print(f"wrote {path}")
    return 1 if errors or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
