"""The benchmark harness (bench/_harness.py) and the generation benchmark's bookkeeping:
statistics against plain recomputation, timers on a fake clock, result files that never
overwrite, the busy/interpreter verdict, and one quick end-to-end run."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import _harness as harness  # noqa: E402
import bench_generate  # noqa: E402


class FakeClock:
    """A clock that only moves when a timed function says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def percentile(xs, q):
    """Linear-interpolation percentile, computed by hand."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- timing statistics ----------------------------------------------------------------------
def test_timing_statistics_match_plain_recomputation(seed):
    rng = random.Random(seed)
    for n in (1, 2, 5, 10, 31):
        xs = [rng.uniform(1e-6, 3.0) for _ in range(n)]
        t = harness.summarize(xs)
        ordered = sorted(xs)
        mid = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        assert t.median == pytest.approx(mid)
        assert (t.min, t.max) == (ordered[0], ordered[-1])
        assert t.iqr == pytest.approx(percentile(xs, 0.75) - percentile(xs, 0.25) if n > 1 else 0)
        assert t.spread == pytest.approx((ordered[-1] - ordered[0]) / mid)
        d = t.to_dict()
        assert d["samples_s"] == xs and d["n"] == n and d["median_s"] == t.median


@pytest.mark.parametrize("bad", [[], [-1.0], [float("nan")], [1.0, float("inf")]])
def test_timing_rejects_impossible_samples(bad):
    with pytest.raises(ValueError, match="Timing"):
        harness.summarize(bad)


def test_timer_times_each_call_after_warmup(seed):
    rng = random.Random(seed)
    durations = [rng.uniform(0.001, 1.0) for _ in range(7)]
    clock, calls = FakeClock(), iter(durations)
    timer = harness.Timer(warmup=2, repeats=5, clock=clock)
    t = timer(lambda: clock.advance(next(calls)))
    assert list(t.samples) == pytest.approx(durations[2:])  # the 2 warm-up calls untimed
    assert t.median == pytest.approx(statistics.median(durations[2:]))


@pytest.mark.parametrize("kwargs, name", [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"),
                                          ({"repeats": 2.5}, "repeats"),
                                          ({"l2_flush_bytes": -4}, "l2_flush_bytes")])
def test_timer_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        harness.Timer(**kwargs)


def test_timer_needs_a_callable():
    with pytest.raises(TypeError, match="callable"):
        harness.Timer()(42)


def test_time_interleaved_rotates_order_and_times_each(seed):
    rng = random.Random(seed)
    cost = {name: rng.uniform(0.01, 0.5) for name in "abc"}
    clock, order = FakeClock(), []

    def make(name):
        def fn():
            order.append(name)
            clock.advance(cost[name])
        return fn

    out = harness.time_interleaved({n: make(n) for n in "abc"}, warmup=1, repeats=4, clock=clock)
    assert order[:3] == list("abc")  # warm-up
    assert order[3:] == list("abc" "bca" "cab" "abc")  # a different one leads each round
    for name, t in out.items():
        assert list(t.samples) == pytest.approx([cost[name]] * 4)


def test_time_interleaved_budget_adds_rounds():
    clock = FakeClock()
    out = harness.time_interleaved({"x": lambda: clock.advance(0.125)}, warmup=0, repeats=2,
                                   budget_s=1.0, clock=clock)
    assert len(out["x"].samples) == 8  # 2 required, then until 1 s of fake time has passed
    with pytest.raises(ValueError, match="budget_s"):
        harness.time_interleaved({"x": lambda: None}, budget_s=-1)
    with pytest.raises(ValueError, match="at least one"):
        harness.time_interleaved({})


# -- load and verdict -----------------------------------------------------------------------
def test_load_monitor_subtracts_own_cpu_time():
    state = {"wall": 0.0, "busy": 100.0, "own": 5.0}
    mon = harness.LoadMonitor(busy_s=lambda: state["busy"], own_s=lambda: state["own"],
                              clock=lambda: state["wall"], cpus=2)
    state.update(wall=10.0, busy=112.0, own=9.0)  # 12 s busy, 4 s ours: others 8 s of 20
    assert mon.share() == pytest.approx(0.4)
    state.update(busy=104.0)  # less busy time than our own (clock tick rounding) -> 0
    assert mon.share() == 0.0
    blind = harness.LoadMonitor(busy_s=lambda: None, own_s=lambda: 0.0)
    assert blind.share() is None


def test_assess_marks_interpreter_and_busy_runs():
    quiet = harness.assess(interpreted=False, other_share=0.02)
    assert quiet["numbers_mean_nothing"] is False and quiet["reasons"] == []
    busy = harness.assess(interpreted=False, other_share=0.5, cpus=2)
    assert busy["numbers_mean_nothing"] and "50%" in busy["reasons"][0]
    interp = harness.assess(interpreted=True, other_share=0.0)
    assert interp["numbers_mean_nothing"] and "interpreter" in interp["reasons"][0]
    # Without /proc/stat the start's load average decides.
    assert harness.assess(interpreted=False, other_share=None, load_average=3.0,
                          cpus=2)["numbers_mean_nothing"]
    assert not harness.assess(interpreted=False, other_share=None, load_average=0.1,
                              cpus=2)["numbers_mean_nothing"]
    assert harness.banner(busy).startswith("NUMBERS MEAN NOTHING")
    assert harness.banner(quiet) == ""


# -- metadata and files ---------------------------------------------------------------------
def test_metadata_names_versions_commit_and_load():
    meta = harness.metadata(threads=3, argv=["--x"], packages=["numpy"])
    assert meta["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert meta["versions"]["numpy"] and meta["threads"] == 3 and meta["argv"] == ["--x"]
    assert meta["cpu_count"] >= 1 and isinstance(meta["isa"]["cpu_flags"], list)
    dt.datetime.fromisoformat(meta["date"])
    if meta["git"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", meta["git"]["commit"])


@pytest.mark.parametrize("device, name, tag", [
    ("cpu", "AMD EPYC 9654 96-Core Processor", "cpu-amd-epyc-9654"),
    ("cpu", "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cpu-intel-xeon-platinum-8480"),
    ("cuda", "NVIDIA H200", "cuda-nvidia-h200"),
    ("cuda:1", "NVIDIA H100 80GB HBM3", "cuda-nvidia-h100-80gb-hbm3"),
    ("cpu", "", "cpu")])
def test_device_tag(device, name, tag):
    assert harness.device_tag(device, name) == tag


def test_result_path_never_names_an_existing_file(tmp_path):
    when = dt.datetime(2026, 11, 23, 12, 59, 30)
    first = harness.result_path("generate", tag="cpu-x", results_dir=tmp_path, when=when)
    assert first.name == "generate_cpu-x_20261123-125930.json"
    harness.write_json(first, {"a": 1})
    second = harness.result_path("generate", tag="cpu-x", results_dir=tmp_path, when=when)
    assert second.name == "generate_cpu-x_20261123-125930-2.json"
    harness.write_json(second, {"a": 2})
    assert harness.result_path("generate", tag="cpu-x", results_dir=tmp_path,
                               when=when).name.endswith("-3.json")
    with pytest.raises(FileExistsError, match="never overwritten"):
        harness.write_json(first, {"a": 3})
    assert json.loads(first.read_text()) == {"a": 1}
    with pytest.raises(ValueError, match="benchmark name"):
        harness.result_path("Bad Name/..", results_dir=tmp_path)


def test_run_writes_meta_verdict_and_payload(tmp_path):
    run = harness.Run("unit", results_dir=tmp_path, interpreted=True, threads=1)
    path = run.finish({"rows": [{"x": 1}]})
    record = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("unit_cpu")
    assert record["benchmark"] == "unit" and record["rows"] == [{"x": 1}]
    assert record["validity"]["numbers_mean_nothing"] is True  # interpreted
    assert record["meta"]["threads"] == 1 and record["meta"]["duration_s"] >= 0
    with pytest.raises(FileExistsError, match="never"):
        harness.Run("unit", out=path)


def test_device_parser_fills_per_device_defaults():
    p = harness.device_parser("x")
    p.add_argument("--repeats", type=int, default=None)
    args = harness.parse_device_args(p, ["--device", "cpu"], repeats=(50, 2))
    assert (args.device, args.repeats, args.out, args.results_dir) == ("cpu", 2, None, None)
    args = harness.parse_device_args(p, ["--device", "cpu", "--repeats", "7"], repeats=(50, 2))
    assert args.repeats == 7
    if not torch.cuda.is_available():
        assert harness.parse_device_args(p, [], repeats=(50, 2)).device == "cpu"
        with pytest.raises(SystemExit, match="no CUDA device"):
            harness.parse_device_args(p, ["--device", "cuda"], repeats=(50, 2))


def test_format_table_text_and_markdown():
    rows = [{"name": "a", "v": 1.234, "r": 2.0}, {"name": "longer", "v": None, "r": 0.5}]
    cols = [harness.Column("name", "engine"), harness.Column("v", "value", ".1f"),
            harness.Column("r", "ratio", lambda x: f"{x:.2f}x")]
    text = harness.format_table(rows, cols).splitlines()
    assert text[0].split() == ["engine", "value", "ratio"]
    assert text[2].split() == ["a", "1.2", "2.00x"] and text[3].split() == ["longer", "-", "0.50x"]
    assert len({len(line) for line in (text[0], text[2], text[3])}) == 1  # aligned
    md = harness.format_table(rows, cols, markdown=True).splitlines()
    assert md[0] == "| engine | value | ratio |" and md[1] == "|---|---:|---:|"
    assert md[3] == "| longer | - | 0.50x |"
    with pytest.raises(ValueError, match="column"):
        harness.format_table(rows, [])


# -- generation benchmark bookkeeping -------------------------------------------------------
def fake_results(rng, n_rounds=3):
    return [{"first_token_s": [rng.uniform(0.1, 1.0)], "total_s": [rng.uniform(2.0, 9.0)],
             "load_s": 1.0, "params": 10, "path": "module",
             "peak_rss_serving_mib": rng.uniform(100, 900), "peak_rss_process_mib": 1000.0,
             "rss_model_ready_mib": 90.0, "device_peak_mib": None, "first_token_curve": []}
            for _ in range(n_rounds)]


def spec(engine, fmt, arch, batch, new_tokens=128):
    return {"engine": engine, "format": fmt, "arch": arch, "batch": batch, "input_len": 512,
            "new_tokens": new_tokens, "threads": 2}


def test_aggregate_and_ratios_match_recomputation(seed):
    rng = random.Random(seed)
    rows, raw = [], {}
    for engine, fmt in (("fastencdec", "int8"), ("ctranslate2", "int8"),
                        ("ctranslate2", "float32"), ("transformers", "fp32")):
        for arch in bench_generate.ARCHS:
            for batch in (1, 8):
                res = fake_results(rng)
                raw[(engine, fmt, arch, batch)] = res
                rows.append(bench_generate.aggregate(spec(engine, fmt, arch, batch), res))
    bench_generate.add_ratios(rows)
    for row in rows:
        res = raw[(row["engine"], row["format"], row["arch"], row["batch"])]
        total = statistics.median(r["total_s"][0] for r in res)
        first = statistics.median(r["first_token_s"][0] for r in res)
        decode = statistics.median(r["total_s"][0] - r["first_token_s"][0] for r in res)
        assert row["total_s"] == pytest.approx(total)
        assert row["first_token_ms"] == pytest.approx(first * 1e3)
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 128 / total)
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] * 127 / decode)
        assert row["peak_rss_mib"] == pytest.approx(max(r["peak_rss_serving_mib"] for r in res))
        peer = bench_generate.find(rows, engine="ctranslate2", format="int8", arch=row["arch"],
                                   batch=row["batch"])
        if row is not peer:
            assert row["x_ct2_int8"] == pytest.approx(peer["total_s"] / row["total_s"])
        else:
            assert "x_ct2_int8" not in row
    cmp = bench_generate.encdec_vs_deconly(rows)
    assert len(cmp) == 8
    for c in cmp:
        ed = bench_generate.find(rows, label=c["label"], batch=c["batch"], arch="encoder_decoder")
        do = bench_generate.find(rows, label=c["label"], batch=c["batch"], arch="decoder_only")
        assert c["first_token_cut"] == pytest.approx(1 - ed["first_token_ms"] / do["first_token_ms"])
        assert c["throughput_ratio"] == pytest.approx(ed["tokens_per_s"] / do["tokens_per_s"])


def _target_args(**changes):
    base = dict(preset="mu-330m", input_len=512, new_tokens=128, threads=2, device="cpu",
                batch_sizes=[1, 8])
    base.update(changes)
    return type("Args", (), base)


def _row(engine, fmt, batch, total_s, first_ms, rss):
    return {"label": f"{engine} {fmt}", "engine": engine, "format": fmt,
            "arch": "encoder_decoder", "batch": batch, "total_s": total_s,
            "first_token_ms": first_ms, "tokens_per_s": batch * 128 / total_s, "peak_rss_mib": rss}


def test_targets_are_marked_met_or_not():
    rows = [_row("fastencdec", "int8", 1, 2.0, 350, 500), _row("ctranslate2", "int8", 1, 3.0, 500, 450),
            _row("fastencdec", "int8", 8, 9.0, 3000, 700), _row("ctranslate2", "int8", 8, 10.0, 4000, 500)]
    bench_generate.add_ratios(rows)
    status = {(t["target"], t["batch"]): t["status"]
              for t in bench_generate.targets(rows, _target_args(), False)}
    assert status[("batch 1 first token <= 400 ms (fastest format)", 1)] == "met"
    assert status[("batch 1, 128 tokens <= 2.5 s (fastest format)", 1)] == "met"
    assert status[("batch 8 >= 130 tokens/s (fastest format)", 8)] == "not met"  # 113.8
    assert status[("int8 >= 1.2x CTranslate2 int8 end to end", 1)] == "met"  # 1.5x
    assert status[("int8 >= 1.2x CTranslate2 int8 end to end", 8)] == "not met"  # 1.11x
    assert status[("int8 peak RSS <= CTranslate2 int8 + 20%", 1)] == "met"  # 500 <= 540
    assert status[("int8 peak RSS <= CTranslate2 int8 + 20%", 8)] == "not met"  # 700 > 600
    assert status[("bf16 >= 1.5x CTranslate2 fp32 end to end", 1)] == "n/a"  # not measured
    rows.append(_row(bench_generate.RUNTIME, "int8", 1, 1.0, 300, 400))
    bench_generate.add_ratios(rows)
    marks = [(t["engine"], t["status"]) for t in bench_generate.targets(rows, _target_args(), False)
             if t["target"] == "int8 peak RSS <= CTranslate2 int8 + 20%" and t["batch"] == 1]
    assert marks == [("fastencdec int8", "met"), (f"{bench_generate.RUNTIME} int8", "met")]
    other = bench_generate.targets(rows, _target_args(input_len=64), True)
    assert all(t["status"].startswith("n/a") for t in other)  # goals hold for 512 -> 128 only


def test_peer_configs_match_the_fastencdec_sizes():
    transformers = pytest.importorskip("transformers")
    import fastencdec

    ed = fastencdec.EncDecConfig.preset("mu-330m")
    do = fastencdec.DecoderOnlyConfig.twin_of(ed)
    with torch.device("meta"):
        t5 = transformers.T5ForConditionalGeneration(
            transformers.T5Config(**bench_generate.t5_config_kwargs(ed.to_dict())))
        llama = transformers.MistralForCausalLM(
            transformers.MistralConfig(**bench_generate.llama_config_kwargs(do.to_dict())))
    t5_params = sum(p.numel() for p in t5.parameters())
    llama_params = sum(p.numel() for p in llama.parameters())
    # T5 has full multi-head K/V and no biases: 347.5M against mu-330m's 332.0M.
    assert t5_params == pytest.approx(347.5e6, rel=2e-3)
    assert llama_params == pytest.approx(do.num_parameters(), rel=0.01)


def test_inputs_are_the_same_for_every_engine_and_avoid_special_ids():
    a = bench_generate.make_inputs(3, 50, 100)
    assert a == bench_generate.make_inputs(3, 50, 100)
    assert all(3 <= t < 100 for row in a for t in row) and len(a) == 3 and len(a[0]) == 50
    names = bench_generate.token_names(100, bench_generate.T5_SPECIALS)
    assert len(names) == 100 and names[:3] == list(bench_generate.T5_SPECIALS) and names[42] == "t42"


# -- one quick run, end to end ---------------------------------------------------------------
def test_quick_run_end_to_end(tmp_path):
    """Fresh worker processes generate with the tiny preset; the JSON holds exactly what
    the rows claim (tokens/s from the measured times, every row the asked token count)."""
    peers = all(harness.package_version(p) for p in ("ctranslate2", "transformers", "tokenizers"))
    cmd = [sys.executable, str(BENCH / "bench_generate.py"), "--quick", "--batch-sizes", "2",
           "--formats", "fp32", "--runtime-formats", "int8", "--ct2-types", "int8",
           "--results-dir", str(tmp_path / "res"),
           "--cache-dir", str(tmp_path / "cache"), "--no-plot", "--threads", "1"]
    if peers:
        cmd += ["--peers", "--archs", "encoder_decoder"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (tmp_path / "res").glob("generate_*.json")
    record = json.loads(path.read_text())
    assert record["setting"]["preset"] == "tiny" and record["errors"] == []
    labels = {(r["label"], r["arch"]) for r in record["rows"]}
    assert ("fastencdec fp32", "encoder_decoder") in labels
    runtime = bench_generate.find(record["rows"], engine=bench_generate.RUNTIME)
    assert runtime["label"] == "fastencdec runtime int8" and runtime["torch_imported"] is False
    if peers:
        assert {("CTranslate2 int8", "encoder_decoder"),
                ("transformers eager fp32", "encoder_decoder")} <= labels
        assert record["prepared"]["peer encoder_decoder"]["ct2_matches_transformers"] is True
        ct2 = bench_generate.find(record["rows"], engine="ctranslate2")
        assert ct2["torch_imported"] is False  # its peak RSS holds no torch runtime
    else:
        assert ("fastencdec fp32", "decoder_only") in labels
    for row in record["rows"]:
        assert row["new_tokens"] == 8 and row["batch"] == 2 and row["threads"] == 1
        assert row["tokens_per_s"] == pytest.approx(2 * 8 / row["total_s"])
        assert 0 < row["first_token_ms"] / 1e3 <= row["total_s"]
        assert row["peak_rss_mib"] > 0
    assert "numbers_mean_nothing" in record["validity"]
    assert all(t["status"].startswith("n/a") for t in record["targets"])
    assert "| engine (encoder-decoder) |" in proc.stdout


# -- the profile's attribution ---------------------------------------------------------------
def test_profile_attributes_every_category(tmp_path, one_thread):
    """A tiny model's profile: encoder GEMMs only in the prefill, the LM head and the
    decoder GEMMs in each step, every attention op call seen, and the counted op time
    within the profiled wall time."""
    import fastencdec
    import profile_generate

    cfg = fastencdec.EncDecConfig.preset("tiny")
    torch.manual_seed(0)
    fastencdec.EncoderDecoderLM(cfg).save_pretrained(tmp_path / "fp32")
    new_tokens = 5
    spec = {"engine": "fastencdec", "format": "fp32-plain", "arch": "encoder_decoder",
            "batch": 2, "input_len": 16, "new_tokens": new_tokens, "threads": 1,
            "device": "cpu", "vocab_size": cfg.vocab_size, "model_dir": str(tmp_path),
            "repeats": 1}
    res = profile_generate.profile_worker(spec)
    pre, dec = res["prefill"], res["decode"]
    assert set(pre) == set(dec) == set(profile_generate.CATEGORIES)
    assert pre["encoder GEMMs"] > 0 and dec["encoder GEMMs"] == 0
    for cat in ("decoder GEMMs", "LM head", "attention ops", "norms/activations"):
        assert dec[cat] > 0, cat
    steps = new_tokens  # BOS and every new token but the last go through the decoder
    calls = res["op_calls"]
    assert calls["decode_attention"] == calls["append_kv_cache"] == steps * cfg.n_decoder_layers
    assert calls["cross_attention"] == steps * cfg.n_decoder_layers
    assert calls["self_attention"] == cfg.n_encoder_layers
    for phase in ("prefill", "decode"):
        counted = sum(v for c, v in res[phase].items() if c != "overhead")
        assert counted <= res["profiled_wall_ms"][phase] * 1.001
        assert res[f"{phase}_overhead_in_profiled_run_ms"] == pytest.approx(
            res["profiled_wall_ms"][phase] - counted)
    from fastencdec import ops

    for name in profile_generate.WRAPPED_OPS:  # the profile's wrappers are gone again
        if hasattr(ops, name):
            assert getattr(ops, name).__module__.startswith("fastencdec"), name


def test_module_kinds():
    import fastencdec
    import profile_generate

    with torch.device("meta"):
        model = fastencdec.EncoderDecoderLM(fastencdec.EncDecConfig.preset("tiny"))
    kinds = {name: profile_generate.module_kind(name, m) for name, m in model.named_modules()
             if name}
    assert kinds["lm_head"] == "linear" and kinds["encoder.0.mlp.fc1"] == "linear"
    assert kinds["encoder_norm"] == "norm" and kinds["encoder.0.mlp"] == "mlp"
    assert kinds["embed"] == "other"
    assert kinds["decoder.0.cross_attn"] == "attention"


def test_dot_peak_measures_the_active_instruction_or_says_none():
    from fastencdec import _C

    for kind in ("int8", "bf16", "fp32"):
        got = _C.dot_peak(kind, 1, 0.01)
        assert got is None or (isinstance(got, float) and got > 0), (kind, got)
    for bad, match in ((("int4", 1, 0.1), "kind must be"), (("fp32", 0, 0.1), "num_threads"),
                       (("fp32", 1, 0.0), "seconds"), (("fp32", 1, 11.0), "seconds")):
        with pytest.raises(ValueError, match=match):
            _C.dot_peak(*bad)
