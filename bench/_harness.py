"""What every benchmark shares: timing, metadata, result files, tables, and a verdict on
whether a run's numbers mean anything.

- ``Timer`` / ``time_interleaved``: warm-up, repeats, median and spread; CUDA events
  (synchronised) on a GPU, ``time.perf_counter`` on the CPU; ``summarize`` for samples
  taken elsewhere (e.g. in a subprocess).
- ``metadata()``: device / CPU model, ISA, threads, versions, git commit, date, load.
- ``LoadMonitor`` + ``assess()``: a run under the Triton interpreter, or on a machine
  where other processes took CPU time meanwhile, is marked "numbers mean nothing".
- ``result_path()``: ``bench/results/<name>_<device>_<YYYYmmdd-HHMMSS>.json``, never
  an existing file; ``Run`` ties metadata, verdict and file together.
- ``format_table()``: aligned text or markdown from rows of dicts.
- ``device_parser()`` / ``parse_device_args()``: the shared ``--device``/``--out`` options.
- ``run_child()``: one measurement in a fresh process (its own peak RSS and threads).

A benchmark script, in short::

    run = harness.Run("decode", device="cuda")            # metadata + load monitor
    timer = harness.Timer(warmup=3, repeats=50, device="cuda", l2_flush_bytes=256 << 20)
    rows = [{"shape": s, "ms": timer(lambda: kernel(s)).median * 1e3} for s in shapes]
    print(harness.format_table(rows, [harness.Column("shape", "shape"),
                                      harness.Column("ms", "ms", ".3f")]))
    run.finish({"rows": rows})   # -> bench/results/decode_cuda-nvidia-h200_<stamp>.json

Only the standard library is imported at module level, so a benchmark's worker process
that measures a peer (CTranslate2, ...) does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent

# Other processes using more than this share of all CPUs during a run make it noise.
BUSY_SHARE = 0.10
# Without /proc/stat, a 1-minute load average above this share of the CPUs does.
BUSY_LOAD_PER_CPU = 0.5

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


# -- timing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one thing, in seconds."""

    samples: tuple[float, ...]

    def __post_init__(self):
        if not self.samples:
            raise ValueError("Timing needs at least one sample")
        bad = [s for s in self.samples if not (math.isfinite(s) and s >= 0)]
        if bad:
            raise ValueError(f"Timing samples must be finite and >= 0 seconds, got {bad[:3]}")

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def iqr(self) -> float:
        """Interquartile range (0 with fewer than two samples)."""
        if len(self.samples) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q3 - q1

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repeats were (0 = identical)."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max,
                "iqr_s": self.iqr, "spread": self.spread, "n": len(self.samples),
                "samples_s": list(self.samples)}


def summarize(samples: Sequence[float]) -> Timing:
    """A ``Timing`` of samples (seconds) measured elsewhere."""
    return Timing(tuple(float(s) for s in samples))


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


class _Stopwatch:
    """Times one call of ``fn``: CUDA events around it on a GPU (with an optional L2
    flush before), ``clock`` differences otherwise."""

    def __init__(self, device, clock: Callable[[], float], l2_flush_bytes: int):
        self.cuda = _is_cuda(device)
        self.clock = clock
        self.flush = None
        if self.cuda:
            import torch

            self.torch = torch
            if l2_flush_bytes:
                self.flush = torch.empty(l2_flush_bytes, dtype=torch.uint8, device=device)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = self.clock()
            fn()
            return self.clock() - start
        if self.flush is not None:
            self.flush.zero_()
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class Timer:
    """``Timer(warmup=2, repeats=10, device="cuda")(fn) -> Timing``.

    ``warmup`` untimed calls (compilation, allocator, caches), then ``repeats`` timed
    ones. On CUDA each call is timed with events and synchronised, optionally after
    zeroing ``l2_flush_bytes`` bytes so that no input stays in L2.
    """

    def __init__(self, *, warmup: int = 1, repeats: int = 5, device="cpu",
                 l2_flush_bytes: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.warmup = _positive_int("warmup", warmup, minimum=0)
        self.repeats = _positive_int("repeats", repeats)
        _positive_int("l2_flush_bytes", l2_flush_bytes, minimum=0)
        self.device = device
        self._watch = _Stopwatch(device, clock, l2_flush_bytes)

    def __call__(self, fn: Callable[[], object]) -> Timing:
        if not callable(fn):
            raise TypeError(f"Timer needs a callable, got {type(fn).__name__}")
        for _ in range(self.warmup):
            fn()
        self._watch.sync()
        return Timing(tuple(self._watch(fn) for _ in range(self.repeats)))


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int = 2,
                     repeats: int = 5, budget_s: float | None = None,
                     max_repeats: int = 10_000, device="cpu", l2_flush_bytes: int = 0,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time several implementations of the same thing rep by rep, rotating their order,
    so that background load and frequency changes hit all of them alike.

    At least ``repeats`` rounds; with ``budget_s``, more rounds until that many
    seconds have passed (at most ``max_repeats``)."""
    if not fns:
        raise ValueError("time_interleaved needs at least one function")
    _positive_int("warmup", warmup, minimum=0)
    _positive_int("repeats", repeats)
    _positive_int("max_repeats", max_repeats, minimum=repeats)
    if budget_s is not None and not (isinstance(budget_s, int | float) and budget_s >= 0):
        raise ValueError(f"budget_s must be a number >= 0 or None, got {budget_s!r}")
    watch = _Stopwatch(device, clock, l2_flush_bytes)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    watch.sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start, rounds = clock(), 0
    while rounds < max_repeats and (
            rounds < repeats or (budget_s is not None and clock() - start < budget_s)):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(watch(fns[name]))
        rounds += 1
    return {name: Timing(tuple(s)) for name, s in samples.items()}


# -- machine load ---------------------------------------------------------------------------
def _proc_stat_busy_s() -> float | None:
    """Busy CPU seconds of all CPUs since boot (everything but idle and iowait)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()  # children: those already waited for (subprocess.run waits)
    return t.user + t.system + t.children_user + t.children_system


class LoadMonitor:
    """CPU time that *other* processes used while a benchmark ran, as a share of all
    CPUs: busy time of every CPU (/proc/stat) minus this process's and its finished
    children's CPU time. ``share()`` is None where /proc/stat is unavailable."""

    def __init__(self, *, busy_s: Callable[[], float | None] = _proc_stat_busy_s,
                 own_s: Callable[[], float] = _own_cpu_s,
                 clock: Callable[[], float] = time.monotonic, cpus: int | None = None):
        self._busy_s, self._own_s, self._clock = busy_s, own_s, clock
        self.cpus = cpus or os.cpu_count() or 1
        self._start = (clock(), busy_s(), own_s())

    def share(self) -> float | None:
        wall0, busy0, own0 = self._start
        busy1 = self._busy_s()
        if busy0 is None or busy1 is None:
            return None
        wall = self._clock() - wall0
        if wall <= 0:
            return 0.0
        others = (busy1 - busy0) - (self._own_s() - own0)
        return min(1.0, max(0.0, others / (wall * self.cpus)))


def assess(*, interpreted: bool, other_share: float | None, load_average: float | None = None,
           cpus: int | None = None) -> dict:
    """Whether a run's timings mean anything.

    ``interpreted``: Triton kernels ran under the CPU interpreter. ``other_share``:
    ``LoadMonitor.share()``. ``load_average``: the 1-minute load average at the start,
    used only when ``other_share`` is unknown. Returns ``{"numbers_mean_nothing": bool,
    "reasons": [...], "other_processes_cpu_share": ...}``."""
    cpus = cpus or os.cpu_count() or 1
    reasons = []
    if interpreted:
        reasons.append("Triton kernels ran under the CPU interpreter (TRITON_INTERPRET=1)")
    if other_share is not None:
        if other_share > BUSY_SHARE:
            reasons.append(f"busy machine: other processes used {100 * other_share:.0f}% of "
                           f"the {cpus} CPUs during the run (limit {100 * BUSY_SHARE:.0f}%)")
    elif load_average is not None and load_average > BUSY_LOAD_PER_CPU * cpus:
        reasons.append(f"busy machine: load average {load_average:.2f} on {cpus} CPUs at the "
                       "start (no /proc/stat to measure the run itself)")
    return {"numbers_mean_nothing": bool(reasons), "reasons": reasons,
            "other_processes_cpu_share": other_share, "load_average_at_start": load_average}


# -- metadata -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def cpu_isa() -> dict:
    """The CPU features that matter for these kernels, and the ISA fastencdec's C++
    kernels run with (None when the extension is not importable)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    active = None
    try:
        from fastencdec import _C

        active = _C.active_isa()
    except Exception:  # noqa: BLE001 - metadata never fails a benchmark
        pass
    return {"fastencdec_cpp": active, "cpu_flags": [f for f in _ISA_FLAGS if f in flags]}


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path = REPO_ROOT) -> dict | None:
    """``{"commit": sha, "dirty": bool}`` (dirty: tracked files changed), or None."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(status.strip())}


def device_name(device="cpu") -> str:
    if _is_cuda(device):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def device_tag(device="cpu", name: str | None = None) -> str:
    """A short file-name-safe device label: ``cpu-amd-epyc``, ``cuda-nvidia-h200``."""
    kind = "cuda" if _is_cuda(device) else "cpu"
    name = (name if name is not None else device_name(device)).lower()
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    slug = "-".join(p for p in slug.split("-") if p not in (kind,))[:40].strip("-")
    return f"{kind}-{slug}" if slug else kind


def metadata(*, device="cpu", threads: int | None = None, argv: Sequence[str] | None = None,
             packages: Sequence[str] = ()) -> dict:
    """Everything needed to tell where and how a result was measured."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "fastencdec", *packages):
        versions[pkg] = package_version(pkg)
    if threads is None and "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "isa": cpu_isa(),
        "threads": threads,
        "versions": versions,
        "git": git_commit(),
        "load_average_at_start": list(load) if load else None,
        "triton_interpret": interpret,
        "forced_backend": os.environ.get("FASTENCDEC_BACKEND") or None,
        "argv": list(sys.argv[1:] if argv is None else argv),
    }


# -- command line -------------------------------------------------------------------------
def device_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every kernel benchmark has: ``--device``,
    ``--results-dir`` and ``--out``; finish with :func:`parse_device_args`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when present, else cpu")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON file (must not exist)")
    return p


def parse_device_args(parser, argv=None, **per_device: tuple[int, int]):
    """Parse, pick the device, and fill each option in ``per_device`` left at None with
    its ``(cuda, cpu)`` default, e.g. ``repeats=(50, 2)``."""
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
    for name, (on_cuda, on_cpu) in per_device.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if args.device == "cuda" else on_cpu)
    return args


# -- result files ---------------------------------------------------------------------------
def check_name(name) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"benchmark name must be lower-case letters, digits, '_', '.' or '-', "
                         f"got {name!r}")
    return name


def result_path(name: str, device: str = "cpu", *, results_dir: Path | None = None,
                when: _dt.datetime | None = None, tag: str | None = None) -> Path:
    """``<results_dir>/<name>_<device tag>_<YYYYmmdd-HHMMSS>.json``; when that exists
    (two runs in one second) ``-2``, ``-3``... is added: an existing file is never
    the answer."""
    check_name(name)
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    stamp = (when or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    stem = f"{name}_{tag or device_tag(device)}_{stamp}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def write_json(path: Path, record: dict) -> Path:
    """Write ``record`` to ``path``, which must not exist yet (checked atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=_json_default) + "\n"
    try:
        with open(path, "x") as f:
            f.write(text)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; benchmark results are never overwritten "
                              "(choose another --out or leave it out)") from None
    return path


def _json_default(value):
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class Run:
    """One benchmark run: metadata at the start, a load monitor throughout, and at
    ``finish(payload)`` the verdict and the JSON file.

        run = Run("attention", device="cuda")
        ...
        path = run.finish({"rows": rows})
    """

    def __init__(self, name: str, *, device="cpu", interpreted: bool | None = None,
                 threads: int | None = None, out: Path | None = None,
                 results_dir: Path | None = None, packages: Sequence[str] = (),
                 argv: Sequence[str] | None = None):
        check_name(name)
        if out is not None and Path(out).exists():
            raise FileExistsError(f"--out {out} exists; benchmark results are never "
                                  "overwritten")
        self.name, self.device, self.out, self.results_dir = name, device, out, results_dir
        self.meta = metadata(device=device, threads=threads, argv=argv, packages=packages)
        self.interpreted = (self.meta["triton_interpret"] and not _is_cuda(device)
                            if interpreted is None else interpreted)
        self.monitor = LoadMonitor()
        self.started = time.monotonic()

    def verdict(self) -> dict:
        load = self.meta["load_average_at_start"]
        return assess(interpreted=self.interpreted, other_share=self.monitor.share(),
                      load_average=load[0] if load else None)

    def finish(self, payload: Mapping, *, verdict: dict | None = None) -> Path:
        verdict = verdict or self.verdict()
        record = {"benchmark": self.name, "meta": {**self.meta,
                  "duration_s": time.monotonic() - self.started},
                  "validity": verdict, **payload}
        path = Path(self.out) if self.out is not None else result_path(
            self.name, self.device, results_dir=self.results_dir,
            tag=device_tag(self.device, self.meta["device_name"]))
        write_json(path, record)
        if verdict["numbers_mean_nothing"]:
            print(banner(verdict), file=sys.stderr)
        return path


def banner(verdict: dict) -> str:
    if not verdict["numbers_mean_nothing"]:
        return ""
    return "NUMBERS MEAN NOTHING: " + "; ".join(verdict["reasons"])


# -- fresh processes ------------------------------------------------------------------------
class ChildFailed(RuntimeError):
    """A measurement process exited badly; the message holds the end of its output."""


def run_child(script: Path, args: Sequence[str], *, env: Mapping[str, str] | None = None,
              timeout: float = 3600) -> dict:
    """Run ``python script *args --result FILE`` in a fresh process (its own peak RSS,
    allocator and thread pools) and return the JSON it wrote to FILE."""
    with tempfile.TemporaryDirectory(prefix="fastencdec-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *args, "--result", str(result_file)]
        try:
            proc = subprocess.run(cmd, env=None if env is None else dict(env),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ChildFailed(f"timed out after {timeout:.0f} s") from None
        if proc.returncode != 0 or not result_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            raise ChildFailed(f"exit code {proc.returncode}: " + " | ".join(tail))
        return json.loads(result_file.read_text())


def thread_env(threads: int) -> dict:
    """This environment with every OpenMP/BLAS runtime limited to ``threads``."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(_positive_int("threads", threads))
    return env


# -- tables ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """``key`` of each row, its ``header``, and ``fmt`` (a format spec such as ``".1f"``
    or a callable ``value -> str``); a missing or None value prints as ``-``."""

    key: str
    header: str
    fmt: str | Callable[[object], str] = ""

    def cell(self, row: Mapping) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        if callable(self.fmt):
            return self.fmt(value)
        try:
            return format(value, self.fmt)
        except (TypeError, ValueError):
            return str(value)


def format_table(rows: Sequence[Mapping], columns: Sequence[Column], *,
                 markdown: bool = False) -> str:
    """Rows as an aligned text table (first column left, others right) or markdown."""
    if not columns:
        raise ValueError("format_table needs at least one column")
    cells = [[c.cell(r) for c in columns] for r in rows]
    headers = [c.header for c in columns]
    if markdown:
        out = ["| " + " | ".join(headers) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(out)
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([line(headers), "-" * len(line(headers)), *map(line, cells)])
