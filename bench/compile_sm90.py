"""Compile every Triton kernel of ``fastencdec.kernels`` for Hopper (sm_90) and Ampere
(sm_80) on a machine without a GPU, with the ptxas that ships in the Triton wheel.

How: the real launchers run on CPU tensors of the benchmark shapes while
``JITFunction.run`` / ``Autotuner.run`` are patched to record each launch instead of
running it (arguments, constexprs, grid options and, for autotuned launches, every
config). Each recorded launch is then bound exactly as the JIT binds it (Triton's own
``create_function_from_signature`` and ``_pack_args`` against a CUDA backend) and
compiled through ``ASTSource`` + ``triton.compile`` for the target.

Per compiled kernel: registers (ptxas), spill stores/loads (the ptxas ``-v`` log),
shared memory (Triton's metadata), and the SASS instruction count of each loop that
holds tensor-core instructions (``cuobjdump -sass``: a loop is a backward branch).

    python bench/compile_sm90.py                # the CI subset, table + JSON
    python bench/compile_sm90.py --full         # every kernel x config x dtype x D
    python bench/compile_sm90.py --rope-loops   # main-loop instruction counts, RoPE vs none

It runs the kernels' modules without ``TRITON_INTERPRET`` (``compile_environment``).
Works with Triton 3.6 and 3.9 (the binder API is the same in both).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

# Opt-in shared memory per block: H100/H200 227 KiB, A100 163 KiB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
MMA_RE = re.compile(r"\b(HGMMA|HMMA|WGMMA|IMMA)\b")
SASS_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRA_RE = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_environment() -> None:
    """Before any kernel module is imported: compile (never interpret), always run ptxas
    (a cache hit would skip it and its log) and print its ``-v`` log (registers, spills)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; quiets 3.9
    if any(name.startswith("fastencdec.kernels.") for name in sys.modules):
        raise RuntimeError("compile_environment() must run before fastencdec.kernels is "
                           "imported (the interpreter would have replaced the kernels)")


# --------------------------------------------------------------------------- recording


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments and the configs to
    compile (one ``{}`` for a plain launch: its options are in ``kwargs``)."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    configs: list[dict] = field(default_factory=lambda: [{}])
    autotuned: bool = False


@contextlib.contextmanager
def recording():
    """Within the block, kernel launches are recorded, not run; yields the list."""
    seen: list[Launch] = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        seen.append(Launch(self, args, kwargs))

    def record_tuner(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        configs = [dict(c.all_kwargs()) for c in self.configs]
        seen.append(Launch(self.fn, args, kwargs, configs, autotuned=True))

    JITFunction.run, Autotuner.run = record_jit, record_tuner
    try:
        yield seen
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A family of launches: ``run()`` calls the launchers on CPU tensors."""

    name: str
    kernel_group: str
    head_dim: int | None
    dtype: str
    run: Callable[[], None]
    fp32: bool = False


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)


def attention_cases(head_dims, dtypes, variants) -> list[Case]:
    """Forward + backward through the Triton backend's adapters (so the RoPE pass and
    everything else the real call launches are included), at bench_attention's shapes:
    B*L = 16k tokens at L = 4096 (Hq/Hkv 16/4)."""
    from fastencdec.ops.backends import triton as tb
    from fastencdec.spec import Rope

    cases = []
    for head_dim in head_dims:
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            for variant in variants:
                causal, padded, rope = variant

                def run(head_dim=head_dim, dt=dt, causal=causal, padded=padded, rope=rope):
                    batch, seq, hq, hkv = 4, 4096, 16, 4
                    q = _empty(batch, seq, hq, head_dim, dtype=dt)
                    k = _empty(batch, seq, hkv, head_dim, dtype=dt)
                    mask = torch.ones(batch, seq, dtype=torch.bool) if padded else None
                    spec = Rope(10000.0) if rope else None
                    scale = head_dim ** -0.5
                    out, lse = tb.self_attention_with_lse(q, k, k, mask, None, 0, causal,
                                                          scale, spec, True)
                    out = _empty(*q.shape, dtype=dt)
                    lse = _empty(batch, hq, seq, dtype=torch.float32)
                    for deterministic in (True, False):  # False: dQ by atomics in dK/dV
                        tb.attention_backward(out, q, k, k, out, lse, mask, None, 0, causal,
                                              scale, spec, True, True, deterministic)
                    os.environ[tb.GROUP_SPLITS_ENV_VAR] = "2"  # the split-group dK/dV
                    try:
                        tb.attention_backward(out, q, k, k, out, lse, mask, None, 0, causal,
                                              scale, spec, False, True, True)
                    finally:
                        del os.environ[tb.GROUP_SPLITS_ENV_VAR]

                tag = ("causal" if causal else "bidir") + ("+pad" if padded else "") \
                    + ("+rope" if rope else "")
                cases.append(Case(f"attention D={head_dim} {tag} {dtype}", "attention",
                                  head_dim, dtype, run, fp32=dtype == "float32"))
    return cases


def decode_cases(head_dims, dtypes) -> list[Case]:
    """bench_decode's shapes: B=8, Hq/Hkv 16/4, Lk 8192, one new token; one split and
    a split + merge launch, cache and cross mode; the KV-cache append with RoPE."""
    from fastencdec.kernels import append_kv_cache as append
    from fastencdec.kernels import decode_attention as decode

    cases = []
    for head_dim in head_dims:
        for dtype in dtypes:
            dt = getattr(torch, dtype)

            def run_decode(head_dim=head_dim, dt=dt):
                batch, lk, hq, hkv = 8, 8192, 16, 4
                q = _empty(batch, 1, hq, head_dim, dtype=dt)
                k = _empty(batch, lk, hkv, head_dim, dtype=dt)
                lens = torch.full((batch,), lk, dtype=torch.int32)
                mask = torch.ones(batch, lk, dtype=torch.bool)
                for splits in (1, 8):
                    decode.decode_attention(q, k, k, seqlens=lens, num_splits=splits)
                    decode.decode_attention(q, k, k, key_mask=mask, num_splits=splits)

            def run_append(head_dim=head_dim, dt=dt):
                batch, lmax, hq, hkv = 8, 8192, 16, 4
                q = _empty(batch, 1, hq, head_dim, dtype=dt)
                k = _empty(batch, 1, hkv, head_dim, dtype=dt)
                cache = _empty(batch, lmax, hkv, head_dim, dtype=dt)
                lens = torch.zeros(batch, dtype=torch.int32)
                turns = torch.zeros(head_dim // 2, dtype=torch.float64)
                append.append_kv_cache(q, k, k, cache, cache, lens, turns)
                append.append_kv_cache(q, k, k, cache, cache, lens, None)

            cases.append(Case(f"decode D={head_dim} {dtype}", "decode", head_dim, dtype,
                              run_decode, fp32=dtype == "float32"))
            cases.append(Case(f"append_kv_cache D={head_dim} {dtype}", "append", head_dim, dtype,
                              run_append, fp32=dtype == "float32"))
    return cases


DISTILL_VARIANTS = [(r, a, t) for r in (True, False)
                    for a, t in ((0.5, 2.0), (0.5, 1.0), (1.0, 1.0), (0.0, 1.0))]


def distill_cases(dtypes, variants=DISTILL_VARIANTS) -> list[Case]:
    """bench_distill_loss's shape: V = 32128 (mu-330m); ``variants`` of (reverse KL,
    alpha, temperature)."""
    from fastencdec.kernels import distill_loss

    cases = []
    for dtype in dtypes:
        dt = getattr(torch, dtype)

        def run(dt=dt):
            rows, vocab = 512, 32128
            z = _empty(rows, vocab, dtype=dt)
            teacher = _empty(rows, vocab, dtype=dt)
            idx = torch.arange(rows)
            losses = _empty(rows, dtype=torch.float32)
            for reverse, alpha, tau in variants:
                distill_loss.distill_rows(
                    z, z, teacher, idx, idx, losses, shared=vocab, alpha=alpha,
                    temperature=tau, reverse=reverse, ignore_index=-100,
                    grad_scale=1.0, write_grad=True)

        cases.append(Case(f"distill V=32128 {dtype}", "distill", None, dtype, run,
                          fp32=dtype == "float32"))
    return cases


def rope_cases(head_dims, dtypes) -> list[Case]:
    """The standalone RoPE kernel (``ops.apply_rope`` on the Triton backend), offset and
    positions-tensor forms, forward and inverse."""
    from fastencdec.ops.backends import triton as tb
    from fastencdec.spec import Rope

    if "apply_rope" not in tb.KERNELS:
        return []
    cases = []
    for head_dim in head_dims:
        for dtype in dtypes:
            dt = getattr(torch, dtype)

            def run(head_dim=head_dim, dt=dt):
                x = _empty(4, 4096, 16, head_dim, dtype=dt)
                pos = torch.zeros(4, 4096, dtype=torch.int64)
                for positions, inverse in ((None, False), (pos, True)):
                    tb.apply_rope(x, positions, 0, Rope(10000.0), inverse)

            cases.append(Case(f"rope D={head_dim} {dtype}", "rope", head_dim, dtype, run,
                              fp32=dtype == "float32"))
    return cases


# (causal, padded, rope): decoder self-attention, padded encoder, cross-attention, ...
def op_cases(dtypes) -> list[Case]:
    """Other ops of the Triton backend whose kernels take (x, weight, eps)-style inputs:
    RMSNorm at mu-330m's width, where the backend has it."""
    from fastencdec.ops.backends import triton as tb

    cases = []
    if "rms_norm" in tb.KERNELS:
        for dtype in dtypes:
            dt = getattr(torch, dtype)

            def run(dt=dt):
                x = _empty(4096, 1024, dtype=dt)
                tb.KERNELS["rms_norm"].fn(x, _empty(1024, dtype=dt), 1e-6)

            cases.append(Case(f"rms_norm d=1024 {dtype}", "norm", None, dtype, run,
                              fp32=dtype == "float32"))
    return cases


VARIANTS_FULL = [(True, False, True), (True, True, True), (False, True, True),
                 (False, False, False)]
# CI: the worst case (every mask and RoPE) and the one that gets the 128x128 tile
VARIANTS_CI = [(True, True, True), (True, False, True)]
# CI compiles these for sm_80 too (the rest only for sm_90)
CI_SM80_KERNELS = ("_attention_fwd_kernel", "_decode_attention_split_kernel")


FULL_DIMS = (32, 64, 80, 96, 128, 256)
FULL_DTYPES = ("bfloat16", "float16", "float32")


def all_cases(full: bool, dims=FULL_DIMS, dtypes=FULL_DTYPES) -> list[Case]:
    if full:
        return (attention_cases(dims, dtypes, VARIANTS_FULL)
                + rope_cases([d for d in (64, 128) if d in dims] or dims[:1], dtypes)
                + decode_cases([d for d in (64, 128, 256) if d in dims] or dims[:1], dtypes)
                + distill_cases(dtypes) + op_cases(dtypes))
    return (attention_cases((128,), ("bfloat16",), VARIANTS_CI)
            + rope_cases((128,), ("bfloat16",)) + decode_cases((128,), ("bfloat16",))
            + distill_cases(("bfloat16",), DISTILL_VARIANTS[:1]) + op_cases(("bfloat16",)))


# --------------------------------------------------------------------------- compiling


@dataclass
class Job:
    case: str
    kernel_group: str
    head_dim: int | None
    dtype: str
    fp32: bool
    launch_index: int
    config_index: int
    arch: int


def _bind(launch: Launch, config: dict, target: GPUTarget):
    """Signature, constexprs, attributes and options exactly as the JIT derives them."""
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **config}
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(
        backend, kwargs, bound, specialization, options)
    key = repr((launch.fn.__name__, specialization, sorted(
        (k, str(v)) for k, v in options.__dict__.items())))
    return signature, constexprs, attrs, options, key


def compile_launch(launch: Launch, config: dict, arch: int):
    """``(CompiledKernel, ptxas log)`` for ``launch`` with ``config`` on ``sm_<arch>``."""
    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options, _ = _bind(launch, config, target)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                target=target, options=options.__dict__)
    return kernel, log.getvalue()


def _tool(name: str) -> str:
    """cuobjdump / nvdisasm from the Triton wheel."""
    from triton.backends.nvidia import compiler as nv

    path = Path(nv.__file__).parent / "bin" / name
    return str(path)


def sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout


def res_usage(cubin: bytes) -> dict:
    """``cuobjdump -res-usage``: REG, STACK, SHARED, LOCAL of the kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def sass_loops(text: str) -> list[dict]:
    """Loops (backward branches) that hold tensor-core instructions, in program order:
    instructions per iteration and how many are MMAs."""
    instrs = [(int(addr, 16), op) for addr, op in SASS_RE.findall(text)]
    loops = []
    for i, (addr, op) in enumerate(instrs):
        m = BRA_RE.search(op)
        if not m or not m.group(1):
            continue
        target = int(m.group(1), 16)
        if target > addr:
            continue
        body = [o for a, o in instrs[: i + 1] if a >= target]
        n_mma = sum(1 for o in body if MMA_RE.search(o))
        if n_mma:
            loops.append({"start": target, "instructions": len(body), "mma": n_mma})
    return sorted(loops, key=lambda x: x["start"])


def parse_ptxas(log: str) -> dict:
    out = {}
    for name, pattern in PTXAS_RE.items():
        values = [int(v) for v in pattern.findall(log)]
        out[name] = max(values) if values else None
    return out


def config_label(launch: Launch, config: dict) -> str:
    merged = {**launch.kwargs, **config}
    parts = [f"{k}={merged[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_V", "BLOCK_H",
                                           "BLOCK_D", "BLOCK_HQ") if k in merged]
    parts.append(f"w{merged.get('num_warps', 4)}")
    parts.append(f"s{merged.get('num_stages', 3)}")
    return " ".join(parts)


def constexpr_label(launch: Launch) -> str:
    keys = ("CAUSAL", "HAS_PAD", "ROPE", "ATOMIC_DQ", "GROUP_SPLIT", "REVERSE", "HAS_DIV",
            "HAS_CE", "TEMPERED", "CAUSAL_CACHE", "HAS_MASK", "SINGLE_SPLIT", "INVERSE",
            "SCALE_PTR")
    return ",".join(f"{k}" for k in keys if launch.kwargs.get(k) is True)


_CASES: dict[str, Case] = {}
_LAUNCHES: dict[str, list[Launch]] = {}


def launches_of(case: Case) -> list[Launch]:
    if case.name not in _LAUNCHES:
        with recording() as seen:
            case.run()
        _LAUNCHES[case.name] = seen
    return _LAUNCHES[case.name]


def plan(cases: list[Case], archs, first_config_only: bool,
         secondary_kernels: tuple[str, ...] | None = None) -> list[Job]:
    """One job per distinct (kernel specialization, config, arch). With
    ``secondary_kernels``, archs after the first only compile those kernels."""
    jobs, keys = [], set()
    for case in cases:
        _CASES[case.name] = case
        for li, launch in enumerate(launches_of(case)):
            configs = launch.configs[:1] if first_config_only else launch.configs
            for ci, config in enumerate(configs):
                for ai, arch in enumerate(archs):
                    if ai and secondary_kernels is not None \
                            and launch.fn.__name__ not in secondary_kernels:
                        continue
                    key = (_bind(launch, config, GPUTarget("cuda", arch, 32))[4], arch)
                    if key in keys:
                        continue
                    keys.add(key)
                    jobs.append(Job(case.name, case.kernel_group, case.head_dim, case.dtype,
                                    case.fp32, li, ci, arch))
    return jobs


def run_job(job: Job, with_sass: bool = True) -> dict:
    launch = launches_of(_CASES[job.case])[job.launch_index]
    config = launch.configs[job.config_index]
    row = {"kernel": launch.fn.__name__, "case": job.case, "group": job.kernel_group,
           "head_dim": job.head_dim, "dtype": job.dtype, "arch": f"sm_{job.arch}",
           "config": config_label(launch, config), "flags": constexpr_label(launch),
           "autotuned": launch.autotuned}
    start = time.perf_counter()
    try:
        kernel, log = compile_launch(launch, config, job.arch)
    except Exception as exc:  # reported in the table; the test fails on it
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[-2000:],
                   traceback=traceback.format_exc()[-3000:])
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row.update(parse_ptxas(log))
    cubin = kernel.asm["cubin"]
    usage = res_usage(cubin)
    row["regs_cuobjdump"] = usage.get("reg")
    row["smem"] = int(kernel.metadata.shared)
    row["smem_limit"] = SMEM_LIMIT[job.arch]
    row["status"] = "ok"
    if with_sass:
        row["mma_loops"] = sass_loops(sass(cubin))
    return row


def run_jobs(jobs: list[Job], n_jobs: int) -> list[dict]:
    if n_jobs <= 1 or len(jobs) <= 1:
        return [run_job(j) for j in jobs]
    # fork: workers inherit the recorded launches (the JIT functions are not picklable)
    import multiprocessing as mp

    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(run_job, jobs))


# --------------------------------------------------------------------------- checks


def violations(rows: list[dict]) -> list[str]:
    """What the rows break: a failed compile; spills in a 16-bit sm_90 kernel; shared
    memory over the sm_90 limit. sm_80 (a secondary target) is reported, and fails
    only where no config of a list fits its 163 KiB: the autotuner skips configs that
    do not fit, and a spilling config is only slow, never chosen over a faster one."""
    problems = []
    fits_80: dict[tuple, bool] = {}
    for r in rows:
        where = f"{r['kernel']} [{r['case']}, {r['config']}, {r['arch']}]"
        if r["status"] != "ok":
            problems.append(f"{where}: does not compile: {r['error'][:300]}")
            continue
        sixteen_bit = r["dtype"] in ("bfloat16", "float16")
        if sixteen_bit and r["arch"] == "sm_90" and (r["spill_stores"] or r["spill_loads"]):
            problems.append(f"{where}: spills {r['spill_stores']} B stores / "
                            f"{r['spill_loads']} B loads")
        if r["arch"] == "sm_90" and r["smem"] > r["smem_limit"]:
            problems.append(f"{where}: {r['smem']} B shared memory > {r['smem_limit']}")
        if r["arch"] == "sm_80":
            key = (r["kernel"], r["case"], r["flags"])
            fits_80[key] = fits_80.get(key, False) or r["smem"] <= r["smem_limit"]
    problems += [f"{k[0]} [{k[1]}]: no config fits sm_80's shared memory"
                 for k, ok in fits_80.items() if not ok]
    return problems


# --------------------------------------------------------------------------- regressions

_CONSTEXPR_MODULE = """
import triton
import triton.language as tl

ANNOTATED: tl.constexpr = 6.2831854820251465  # an annotated module global
INSTANCE = tl.constexpr(6.2831854820251465)   # a tl.constexpr instance


@triton.jit
def annotated_kernel(X):
    tl.store(X, tl.load(X) * ANNOTATED)


@triton.jit
def instance_kernel(X):
    tl.store(X, tl.load(X) * INSTANCE)
"""


def constexpr_global_check(arch: int = 90) -> dict:
    """Whether a kernel reading ``X: tl.constexpr = 1.0`` (an annotated module global)
    compiles, and whether one reading ``X = tl.constexpr(1.0)`` does. The interpreter
    accepts both; the compiler rejects the first (the KV-cache append crash)."""
    import importlib.util

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "constexpr_globals.py"
        path.write_text(_CONSTEXPR_MODULE)
        spec = importlib.util.spec_from_file_location("constexpr_globals", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = {}
        x = torch.empty(4, dtype=torch.float32)
        for name in ("annotated_kernel", "instance_kernel"):
            with recording() as seen:
                getattr(module, name)[(1,)](x)
            try:
                compile_launch(seen[0], {}, arch)
                result[name] = None
            except Exception as exc:  # the expected failure is a CompilationError
                result[name] = f"{type(exc).__name__}: {exc}"[:400]
    return result


def launchable_kernels() -> set[str]:
    """Names of the ``@triton.jit`` functions of ``fastencdec.kernels`` that are
    launched (``_..._kernel``; the rest are helpers compiled into them)."""
    import importlib
    import pkgutil

    import fastencdec.kernels as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"fastencdec.kernels.{info.name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and isinstance(value, JITFunction):
                names.add(attr)
    return names


# --------------------------------------------------------------------------- RoPE loops


# One fixed (BLOCK_M, BLOCK_N, warps, stages) per kernel, so that only RoPE differs.
LOOP_CONFIGS = {"_attention_fwd_kernel": (128, 64, 8, 3),
                "_attention_bwd_dkdv_kernel": (32, 64, 8, 2),
                "_attention_bwd_dq_kernel": (128, 32, 8, 2)}


def rope_loop_comparison(head_dims=(64, 128)) -> list[dict]:
    """SASS instructions per main-loop iteration of the attention kernels with RoPE
    (what ``self_attention`` launches) and without (``rope=False``): causal, bf16."""
    rows = []
    for head_dim in head_dims:
        for rope in (True, False):
            case = attention_cases((head_dim,), ("bfloat16",), [(True, False, rope)])[0]
            for launch in launches_of(case):
                if launch.fn.__name__ not in LOOP_CONFIGS:
                    continue  # the RoPE pass and the preprocess kernel have no main loop
                if launch.kwargs.get("ATOMIC_DQ") or launch.kwargs.get("GROUP_SPLIT"):
                    continue  # the default (deterministic, whole-group) backward only
                bm, bn, warps, stages = LOOP_CONFIGS[launch.fn.__name__]
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                kernel, log = compile_launch(launch, cfg, 90)
                loops = sass_loops(sass(kernel.asm["cubin"]))
                rows.append({"kernel": launch.fn.__name__, "head_dim": head_dim, "rope": rope,
                             "flags": constexpr_label(launch),
                             "config": f"{bm}x{bn} w{warps} s{stages}",
                             "main_loop_instructions": loops[0]["instructions"] if loops else None,
                             "loops": loops, "smem": int(kernel.metadata.shared),
                             **parse_ptxas(log)})
    return rows


# --------------------------------------------------------------------------- main


def _table(rows: list[dict]) -> str:
    import _harness as harness

    cols = [harness.Column("kernel", "kernel"), harness.Column("case", "case"),
            harness.Column("flags", "flags"), harness.Column("config", "config"),
            harness.Column("arch", "arch"), harness.Column("regs", "regs"),
            harness.Column("spill_stores", "spill B"), harness.Column("smem", "smem B"),
            harness.Column("status", "status")]
    return harness.format_table(rows, cols)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every kernel, autotune config, dtype and head_dim (default: "
                             "the CI subset)")
    parser.add_argument("--arch", type=int, nargs="+", default=None,
                        help="compute capabilities (default: 90 80)")
    parser.add_argument("--dims", type=int, nargs="+", default=list(FULL_DIMS),
                        help="head dims of --full")
    parser.add_argument("--dtypes", nargs="+", default=list(FULL_DTYPES),
                        choices=FULL_DTYPES, help="dtypes of --full")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--rope-loops", action="store_true",
                        help="only the RoPE vs rope=False main-loop comparison")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (must not exist)")
    args = parser.parse_args(argv)
    compile_environment()
    import _harness as harness

    meta = {"triton": triton.__version__, "torch": torch.__version__,
            "git": harness.git_commit(), "argv": sys.argv[1:] if argv is None else list(argv)}
    if args.rope_loops:
        rows = rope_loop_comparison()
        for r in rows:
            print(f"{r['kernel']:<32} D={r['head_dim']:<4} rope={str(r['rope']):<5} "
                  f"{r['config']}  main loop {r['main_loop_instructions']} instr, "
                  f"regs {r['regs']}, smem {r['smem']}")
        record = {"benchmark": "rope_loops_sm90", "meta": meta, "rows": rows}
        name = "rope_loops_sm90"
        problems = []
    else:
        archs = args.arch or [90, 80]
        cases = all_cases(args.full, tuple(args.dims), tuple(args.dtypes))
        jobs = plan(cases, archs, first_config_only=not args.full,
                    secondary_kernels=None if args.full else CI_SM80_KERNELS)
        print(f"{len(jobs)} compiles ({'full' if args.full else 'CI subset'}), "
              f"{args.jobs} processes, Triton {triton.__version__}", flush=True)
        start = time.perf_counter()
        rows = run_jobs(jobs, args.jobs)
        problems = violations(rows)
        print(_table(rows))
        print(f"{len(rows)} kernels compiled in {time.perf_counter() - start:.0f} s")
        compiled = {r["kernel"] for r in rows}
        missing = sorted(launchable_kernels() - compiled)
        problems += [f"{name}: never launched by any case (not compiled)" for name in missing]
        check = constexpr_global_check()
        if check["annotated_kernel"] is None:
            problems.append("an annotated tl.constexpr module global compiled: the "
                            "regression check no longer sees the failure it guards against")
        if check["instance_kernel"] is not None:
            problems.append(f"a tl.constexpr(...) module global does not compile: "
                            f"{check['instance_kernel']}")
        print(f"constexpr globals: annotated -> {check['annotated_kernel'] or 'compiled'}; "
              f"tl.constexpr(...) -> {check['instance_kernel'] or 'compiled'}")
        name = "compile_sm90_full" if args.full else "compile_sm90_ci"
        record = {"benchmark": name, "meta": meta, "smem_limits": SMEM_LIMIT, "rows": rows,
                  "constexpr_global_check": check, "launchable_kernels": sorted(
                      launchable_kernels()), "problems": problems}
    print(f"{len(problems)} problems")
    for p in problems:
        print("  " + p)
    path = args.out or harness.result_path(name, tag="ptxas")
    harness.write_json(path, record)
    print(f"wrote {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
