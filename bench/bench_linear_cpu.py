"""CPU linear layers in every weight format PyTorch can run: which library path is fastest.

For the mu-330m linear shapes (fc1 1024->4096, fc2 4096->1024, q 1024->384, k/v
1024->192, out 384->1024, fused qkv 1024->768, LM head 1024->32128) at M = 1 and 8
rows (decode GEMVs) and M = 512 (the encoder's GEMMs), on 1 and 2 threads, it times:

  fp32 activations   fp32 ``F.linear`` (MKL) | fp32 MKL-packed ``mkl._mkl_linear`` |
                     fp16 weights via fbgemm ``quantized.linear_dynamic_fp16`` |
                     int8 weight-only ``_weight_int8pack_mm`` (fp32 input, and with the
                     input cast to bf16) | int8 dynamic (u8 activations, per tensor)
                     ``quantized.linear_dynamic`` with fbgemm- and oneDNN-packed weights |
                     int8 oneDNN ``onednn.qlinear_pointwise`` (u8 activations quantised in
                     eager code) | int8 x int8 -> int32 ``_int_mm`` with per-row scales |
                     fastencdec's ``Int8Linear`` (its own C++ kernel, per-row activation grids)
  bf16 activations   bf16 ``F.linear`` (oneDNN) | bf16 oneDNN-packed ``mkldnn._linear_pointwise``
                     | fastencdec's ``Bf16Linear`` | int8 weight-only ``_weight_int8pack_mm`` |
                     int4 weight-only ``_weight_int4pack_mm_for_cpu`` (group 128; reference)

Every candidate includes its bias and whatever activation conversion / quantisation
it needs, i.e. what an ``nn.Linear`` replacement would pay. Decoding streams all of a
model's weights once per token, so each candidate cycles through enough copies of
its weights (>= 4x the last-level cache) that they are read from DRAM, as in a real
decode step. Effective weight GB/s = stored weight bytes (incl. scales) / time,
also as a fraction of the machine's copy bandwidth measured in the same run (copy
counts read + write bytes, as STREAM does); GFLOP/s also as a fraction ("%peak") of
the multiply-accumulate ceiling of the candidate's compute precision, measured at the
start and the end of the run (``_C.dot_peak``: AVX-512 VNNI / BF16 / FMA instructions
on registers; a VM's CPU has no datasheet). Each candidate's relative error vs a
float64 reference is reported, so a fast but wrong path is visible.

Candidates are timed interleaved, sample by sample, so that background load hits
them alike; the table shows medians by the wall clock and by this process's CPU time
per thread (which leaves out the time spent waiting for a core on a shared machine;
``--clock cpu`` bases GB/s and ratios on it). The load average is recorded.
``--quick`` runs a reduced grid in seconds (fc1 and k/v, M = 1 and 8, 1 thread, few
weight copies, so its GEMVs are partly cache-resident and optimistic: a smoke test).
A full run takes ~10 minutes on 2 idle cores (longer on a shared machine).

    python bench/bench_linear_cpu.py [--quick] [--threads 1,2] [--rows 1,8,512]
        [--shapes fc1,lm_head] [--clock wall|cpu] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name: (in_features, out_features, has_bias) for mu-330m
    "fc1": (1024, 4096, True),
    "fc2": (4096, 1024, True),
    "q": (1024, 384, True),
    "k/v": (1024, 192, True),
    "out": (384, 1024, True),
    "qkv": (1024, 768, True),
    "lm_head": (1024, 32128, False),
}
ROWS = (1, 8, 512)
STREAM_BYTES = 128 << 20  # >= 4x a 32 MiB L3: weights come from DRAM, as in decoding
CLOCK = "wall"  # or "cpu" (--clock): which clock the table's ms and GB/s use


# -- machine ----------------------------------------------------------------------------
def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
           if f in flags]
    return {"model": model, "cores": os.cpu_count(), "isa": isa}


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def bandwidth(threads: int, repeats: int, nbytes: int = 256 << 20) -> dict:
    """Copy GB/s ((read + write) bytes / time, STREAM's convention) and read-only GB/s
    (a sum over the buffer), medians of ``repeats``, by both clocks."""
    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    src.sum()
    copy, read = [], []
    for _ in range(repeats):
        copy.append(sample(lambda _: dst.copy_(src), None, 1))
        read.append(sample(lambda _: src.sum(), None, 1))
    out = {}
    for i, clock in enumerate(("wall", "cpu")):
        out[f"copy_gbs_{clock}"] = 2 * nbytes / statistics.median(t[i] for t in copy) / 1e9
        out[f"read_gbs_{clock}"] = nbytes / statistics.median(t[i] for t in read) / 1e9
    out["copy_gbs"], out["read_gbs"] = out[f"copy_gbs_{CLOCK}"], out[f"read_gbs_{CLOCK}"]
    return out


def dot_peaks(threads: int) -> dict:
    """Measured GMAC/s ceilings ``{int8, bf16, fp32: value or None}`` of the instructions
    the kernels use (``_C.dot_peak``: AVX-512 VNNI / BF16 / FMA on registers), or {} when
    the compiled module is missing."""
    try:
        from fastencdec import _C
    except ImportError:
        return {}
    return {kind: _C.dot_peak(kind, threads, 0.5) for kind in ("int8", "bf16", "fp32")}


# -- candidates -------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    weights: str      # stored weight format
    act: torch.dtype  # activation (input and output) dtype
    build: Callable   # (w fp32 [N, K], b fp32 [N] | None, rows) -> fn(x) -> y
    max_rows: int = 1 << 30  # larger M is skipped (a scalar fallback kernel: minutes)
    skip_reason: str = ""
    per_rows: bool = False  # the packed weights depend on M (built per row count)
    compute: str = ""  # the MACs' precision (the %peak ceiling); "" = the weight format


def per_channel_int8(w):
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _plain(w, b, rows):
    w = w.clone()  # every copy owns its memory: copies are what make the weights stream
    return lambda x: F.linear(x, w, b)


def _mkl_packed(w, b, rows):
    w = w.clone()
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, b, rows)


def _bf16(w, b, rows):
    return _plain(w.bfloat16(), None if b is None else b.bfloat16(), rows)


def _bf16_packed(w, b, rows):
    packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows)
    bias = None if b is None else b.bfloat16()
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _fp16_fbgemm(w, b, rows):
    packed = torch.ops.quantized.linear_prepack_fp16(w, b)
    return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)


def _int8_weight_only(dtype):
    def build(w, b, rows):
        wq, scale = per_channel_int8(w)
        scale = scale.to(dtype)
        bias = None if b is None else b.to(dtype)
        if bias is None:
            return lambda x: torch._weight_int8pack_mm(x, wq, scale)
        return lambda x: torch._weight_int8pack_mm(x, wq, scale) + bias
    return build


def _int8_weight_only_via_bf16(w, b, rows):
    """fp32 activations cast to bf16 for the vectorised kernel (unit scales), then
    fp32 per-channel scales and bias in one addcmul."""
    wq, scale = per_channel_int8(w)
    ones = torch.ones_like(scale, dtype=torch.bfloat16)
    bias = torch.zeros_like(scale) if b is None else b
    return lambda x: torch.addcmul(bias, torch._weight_int8pack_mm(x.bfloat16(), wq, ones),
                                   scale)


def _quantized_tensor(w):
    wq, scale = per_channel_int8(w)
    with warnings.catch_warnings():  # quantized tensors are deprecated but still the API
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(
            wq, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)


def _dynamic(engine: str):
    def build(w, b, rows):
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            packed = torch.ops.quantized.linear_prepack(_quantized_tensor(w), b)
        finally:
            torch.backends.quantized.engine = old
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)
    return build


def _onednn_qlinear(w, b, rows):
    wq, scale = per_channel_int8(w)
    packed = torch.ops.onednn.qlinear_prepack(wq, [rows, w.shape[1]])
    zeros = torch.zeros(w.shape[0], dtype=torch.long)

    def fn(x):  # u8 asymmetric per-tensor activations, computed without a host sync
        lo, hi = torch.aminmax(x)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        sx = ((hi - lo) / 255).clamp_(min=1e-30)
        zp = torch.round(-lo / sx).to(torch.long)
        xq = torch.round(x / sx).add_(zp).clamp_(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise.tensor(
            xq, sx, zp, packed, scale, zeros, b, 1.0, 0, torch.float32, "none", [], "")
    return fn


def _int_mm(w, b, rows):
    wq, scale = per_channel_int8(w)
    wt = wq.t()

    def fn(x):
        sx = (x.abs().amax(-1, keepdim=True) / 127).clamp_(min=1e-30)
        xq = torch.round(x / sx).to(torch.int8)
        y = torch._int_mm(xq, wt) * (sx * scale)
        return y if b is None else y.add_(b)
    return fn


def _int4_weight_only(w, b, rows, group=128):
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    # w ~= (q - 8) * scale + zero with zero = lo + 8 * scale (the op's convention)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1)
    sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
    bias = None if b is None else b.bfloat16()

    def fn(x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
        return y if bias is None else y + bias
    return fn


def _fastencdec(fmt):
    """The module ``to_inference`` puts in place of an ``nn.Linear`` for ``fmt``."""
    def build(w, b, rows):
        from fastencdec.models.quantize import Bf16Linear, Int8Linear

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        module = (Int8Linear if fmt == "int8" else Bf16Linear).from_float(lin)
        return torch.no_grad()(module.forward)
    return build


SCALAR_FALLBACK = "scalar fallback kernel (>10x slower already at M=8)"
CANDIDATES = [
    Candidate("fp32 F.linear (MKL)", "fp32", torch.float32, _plain),
    Candidate("fp32 mkl._mkl_linear packed", "fp32", torch.float32, _mkl_packed, per_rows=True),
    Candidate("fp16w fbgemm linear_dynamic_fp16", "fp16", torch.float32, _fp16_fbgemm,
              compute="fp32"),
    Candidate("int8w _weight_int8pack_mm fp32-act", "int8", torch.float32,
              _int8_weight_only(torch.float32), max_rows=8, skip_reason=SCALAR_FALLBACK,
              compute="fp32"),
    Candidate("int8w _weight_int8pack_mm via bf16", "int8", torch.float32,
              _int8_weight_only_via_bf16, compute="bf16"),
    Candidate("int8 dyn fbgemm", "int8", torch.float32, _dynamic("fbgemm")),
    Candidate("fastencdec Int8Linear", "int8", torch.float32, _fastencdec("int8")),
    Candidate("int8 dyn onednn-engine", "int8", torch.float32, _dynamic("onednn")),
    Candidate("int8 onednn.qlinear_pointwise", "int8", torch.float32, _onednn_qlinear,
              per_rows=True),
    Candidate("int8 _int_mm per-row", "int8", torch.float32, _int_mm),
    Candidate("bf16 F.linear (oneDNN)", "bf16", torch.bfloat16, _bf16),
    Candidate("bf16 mkldnn._linear_pointwise packed", "bf16", torch.bfloat16, _bf16_packed,
              per_rows=True),
    Candidate("fastencdec Bf16Linear", "bf16", torch.bfloat16, _fastencdec("bf16")),
    Candidate("int8w _weight_int8pack_mm bf16-act", "int8", torch.bfloat16,
              _int8_weight_only(torch.bfloat16), compute="bf16"),
    Candidate("int4w _weight_int4pack_mm (g128)", "int4", torch.bfloat16, _int4_weight_only,
              compute="bf16"),
]
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def weight_bytes(fmt: str, k: int, n: int, bias: bool) -> float:
    """Bytes a forward pass must read: weights, scales (fp32 per channel / per group)."""
    total = WEIGHT_BYTES[fmt] * n * k + (4 * n if bias else 0)
    if fmt == "int8":
        total += 4 * n
    elif fmt == "int4":
        total += 2 * 2 * n * (k // 128)
    return total


# -- timing -----------------------------------------------------------------------------
class Rotating:
    """Calls one candidate on its copies of the weights in turn."""

    def __init__(self, fns):
        self.fns, self.i = fns, 0

    def __call__(self, x):
        self.i = (self.i + 1) % len(self.fns)
        return self.fns[self.i](x)


def sample(fn, x, calls: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds / threads) per call. On a machine shared
    with other work the wall clock also counts the time this process waited for a
    core; the CPU clock does not (it still sees their cache and DRAM traffic)."""
    threads = torch.get_num_threads()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t) / calls, (time.process_time() - c) / calls / threads


def calibrate(fn, x, target_s: float) -> int:
    fn(x)
    fn(x)
    once = sample(fn, x, 1)[0]
    return max(1, min(2000, int(target_s / max(once, 1e-7))))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def run_shape(name, k, n, has_bias, rows_list, threads_list, repeats, target_s, log):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    b = torch.randn(n, generator=gen) * 0.1 if has_bias else None
    if name == "lm_head":  # generation never runs the LM head on more than the batch's rows
        rows_list = [r for r in rows_list if r <= 8]
    results = []
    built: dict[tuple[str, int], Rotating] = {}
    for cand in CANDIDATES:  # weights are built once per candidate (and per M if packed per M)
        nbytes = weight_bytes(cand.weights, k, n, has_bias)
        for rows in (rows_list if cand.per_rows else [None]):
            # GEMMs at large M are compute-bound: two copies do; GEMVs stream.
            copies = 2 if (rows or 1) > 8 else max(2, math.ceil(STREAM_BYTES / nbytes))
            try:
                fns = [cand.build(w, b, rows or 1) for _ in range(copies)]
            except Exception as e:  # noqa: BLE001 - an unusable path is a result too
                log(f"  {cand.name}: unusable ({type(e).__name__}: {str(e)[:120]})")
                fns = None
            built[(cand.name, rows)] = Rotating(fns) if fns else None
    for threads in threads_list:
        torch.set_num_threads(threads)
        for rows in rows_list:
            x32 = torch.randn(rows, k, generator=gen)
            ref = F.linear(x32.double(), w.double(), None if b is None else b.double())
            active = []
            for cand in CANDIDATES:
                fn = built[(cand.name, rows if cand.per_rows else None)]
                row = {"shape": name, "k": k, "n": n, "rows": rows, "threads": threads,
                       "candidate": cand.name, "weights": cand.weights,
                       "compute": cand.compute or cand.weights,
                       "act": str(cand.act).replace("torch.", "")}
                if fn is None:
                    row["skipped"] = "unusable"
                elif rows > cand.max_rows:
                    row["skipped"] = cand.skip_reason
                else:
                    x = x32.to(cand.act)
                    try:
                        row["rel_error"] = rel_error(fn.fns[0](x), ref)
                        active.append((cand, fn, x, row, calibrate(fn, x, target_s), []))
                    except Exception as e:  # noqa: BLE001
                        row["skipped"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
                results.append(row)
            for _ in range(repeats):  # interleaved: background load hits every candidate
                for _cand, fn, x, _row, calls, times in active:
                    times.append(sample(fn, x, calls))
            for cand, _fn, _x, row, calls, times in active:
                wall = statistics.median(w for w, _ in times)
                cpu = statistics.median(c for _, c in times)
                t = cpu if CLOCK == "cpu" else wall
                nbytes = weight_bytes(cand.weights, k, n, b is not None)
                row.update(ms=t * 1e3, wall_ms=wall * 1e3, cpu_ms=cpu * 1e3,
                           wall_ms_min=min(w for w, _ in times) * 1e3,
                           weight_gbs=nbytes / t / 1e9, gflops=2 * rows * k * n / t / 1e9,
                           samples=len(times), calls=calls)
    return results


# -- report -----------------------------------------------------------------------------
def print_table(results, bw, peaks, log):
    keyed = {}
    for r in results:
        keyed.setdefault((r["shape"], r["rows"], r["threads"]), []).append(r)
    for (shape, rows, threads), rs in keyed.items():
        copy = bw[threads]["copy_gbs"]
        fp32 = next((r["ms"] for r in rs if r["candidate"].startswith("fp32 F.linear")
                     and "ms" in r), None)
        log(f"\n{shape} {rs[0]['k']}->{rs[0]['n']}  M={rows}  threads={threads}  "
            f"(copy {copy:.1f} GB/s; GB/s, %copy, GFLOP/s and ratios by the {CLOCK} clock)")
        log(f"  {'candidate':40s} {'wall ms':>8s} {'cpu ms':>8s} {'GB/s':>7s} {'%copy':>6s} "
            f"{'GFLOP/s':>8s} {'%peak':>6s} {'vs fp32':>7s} {'rel err':>8s}")
        for r in rs:
            if "ms" not in r:
                log(f"  {r['candidate']:40s} skipped: {r.get('skipped')}")
                continue
            r["copy_fraction"] = r["weight_gbs"] / copy
            r["speedup_vs_fp32"] = fp32 / r["ms"] if fp32 else None
            # MACs per second over the ceiling of the weight format's instruction
            peak = peaks.get(threads, {}).get(r["compute"])
            r["peak_fraction"] = r["gflops"] / 2 / peak if peak else None
            pct = f"{100 * r['peak_fraction']:5.0f}%" if peak else f"{'-':>6s}"
            log(f"  {r['candidate']:40s} {r['wall_ms']:8.3f} {r['cpu_ms']:8.3f} "
                f"{r['weight_gbs']:7.1f} {100 * r['copy_fraction']:5.0f}% {r['gflops']:8.1f} "
                f"{pct} {r['speedup_vs_fp32'] or float('nan'):6.2f}x {r['rel_error']:8.1e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a reduced grid in seconds")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts (default 1,2; --quick: 1)")
    ap.add_argument("--repeats", type=int, default=None, help="samples per point (median)")
    ap.add_argument("--shapes", default=None, help=f"subset of {','.join(SHAPES)}")
    ap.add_argument("--rows", default=None, help="comma-separated M values (default 1,8,512)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="clock for GB/s and ratios: cpu = this process's CPU time per "
                         "thread, for a machine shared with other work (both are recorded)")
    args = ap.parse_args(argv)

    threads_arg = args.threads or ("1" if args.quick else "1,2")
    threads_list = [int(t) for t in threads_arg.split(",")]
    if any(t < 1 for t in threads_list):
        ap.error(f"--threads must be positive ints, got {args.threads!r}")
    shapes = args.shapes.split(",") if args.shapes else (
        ["fc1", "k/v"] if args.quick else list(SHAPES))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    rows_list = [int(r) for r in args.rows.split(",")] if args.rows else (
        (1, 8) if args.quick else ROWS)
    if any(r < 1 for r in rows_list):
        ap.error(f"--rows must be positive ints, got {args.rows!r}")
    repeats = args.repeats or (3 if args.quick else 9)
    target_s = 0.003 if args.quick else 0.005
    global STREAM_BYTES, CLOCK
    # --quick: a few copies only (weights partly cache-resident: optimistic GEMVs) and
    # two shapes, so that it runs in well under a minute on an idle machine.
    CLOCK = args.clock
    if args.quick:
        STREAM_BYTES = 16 << 20
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    info = cpu_info()
    old_threads = torch.get_num_threads()
    record = {"benchmark": "linear_cpu", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "cpu": info, "quick": args.quick,
              "stream_bytes": STREAM_BYTES, "clock": CLOCK,
              "loadavg_start": loadavg()}
    log(f"CPU {info['model']} ({info['cores']} cores; {' '.join(info['isa'])}), "
        f"torch {torch.__version__}, load average {record['loadavg_start']}")
    bw = {t: bandwidth(t, repeats) for t in threads_list}
    for t, v in bw.items():
        log(f"threads={t}: copy {v['copy_gbs_wall']:.1f} GB/s (read+write) by the wall clock, "
            f"{v['copy_gbs_cpu']:.1f} by the CPU clock; read {v['read_gbs_wall']:.1f} / "
            f"{v['read_gbs_cpu']:.1f} GB/s")
    peaks = {t: dot_peaks(t) for t in threads_list}
    for t, v in peaks.items():
        log(f"threads={t}: multiply-accumulate ceiling (GMAC/s, registers only): "
            + ", ".join(f"{k} {'-' if g is None else f'{g:.0f}'}" for k, g in v.items()))
    results, loads = [], []
    for name in shapes:
        k, n, has_bias = SHAPES[name]
        loads.append(loadavg())
        print(f"[{name}: load average {loads[-1]}]", flush=True)
        results += run_shape(name, k, n, has_bias, rows_list, threads_list, repeats, target_s,
                             log)
    torch.set_num_threads(old_threads)
    record.update(loadavg_end=loadavg(), loadavg_per_shape=dict(zip(shapes, loads, strict=True)),
                  bandwidth={str(t): v for t, v in bw.items()})
    # The ceiling again at the end (a VM's speed drifts): the table uses the mean.
    peaks_end = {t: dot_peaks(t) for t in threads_list}
    peaks = {t: {k: (v + peaks_end[t][k]) / 2 if v and peaks_end[t].get(k) else None
                 for k, v in peaks[t].items()} for t in threads_list}
    record["dot_peak_gmacs"] = {str(t): v for t, v in peaks.items()}
    record["dot_peak_gmacs_end"] = {str(t): v for t, v in peaks_end.items()}
    print_table(results, bw, peaks, log)
    log(f"\nload average at start {record['loadavg_start']}, end {record['loadavg_end']} "
        f"(on {info['cores']} cores: > cores means the timings are shared)")
    record["results"] = results
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" /
        f"linear_cpu{'_quick' if args.quick else ''}_{_dt.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
