"""Benchmark the fused distillation loss (LM head + reverse KL + CE), forward + backward.

Rows (peak extra memory over the inputs, median time of forward + backward):
- ``torch``: plain PyTorch (``fastencdec.reference``): lm_head -> fp32 log_softmax ->
  KL + CE, every ``[N, V]`` intermediate materialised; teacher logits given.
- ``fastencdec``: ``ops.distill_loss`` (chunked LM head + Triton kernel); teacher
  logits given.
- ``fastencdec (teacher hidden)``: ``ops.distill_loss_from_teacher_hidden``: the
  teacher's LM head is fused too (teacher hidden states + head weight given).
- ``liger JSD beta=1``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked, hard
  loss weight 0.5), only if ``liger_kernel`` imports; it takes teacher hidden states,
  so compare it with the "teacher hidden" row.

On a CUDA machine: N=8192, d=1024, V=32128 (mu-330m's head), bf16. Without CUDA
a tiny fp32 shape runs through the Triton interpreter (a smoke test; its times and
memory mean nothing).

    python bench/bench_distill_loss.py [--device cuda|cpu] [--iters N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import triton  # noqa: E402

from fastencdec import ops, reference  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_SHAPE = dict(n=8192, d=1024, vocab=32128, teacher_d=1024)
CPU_SHAPE = dict(n=64, d=32, vocab=500, teacher_d=48)
ALPHA, TAU = 0.5, 1.0


def liger_loss():
    """(Liger's chunked fused-linear JSD with beta=1, or None; a note on why not)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA,
                                     beta=1.0, temperature=TAU)
    except Exception as exc:
        return None, f"no Liger row ({type(exc).__name__}: {exc})"[:200]

    def run(h, w, th, tw, labels):
        try:
            return fn(h, w, th, tw, labels)
        except TypeError:  # newer versions take student/teacher biases too
            return fn(h, w, th, tw, labels, None, None)

    return run, None


def measure(fn, device, iters):
    """(median ms, peak extra bytes) of ``fn()`` (forward + backward)."""
    fn()  # compile / warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return statistics.median(times), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--iters", type=int, default=None, help="timed runs per row")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    os.environ["FASTENCDEC_BACKEND"] = "triton"
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32  # bf16 is unreliable in the interpreter
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    iters = args.iters or (10 if on_gpu else 1)
    n, d, vocab, t_d = shape["n"], shape["d"], shape["vocab"], shape["teacher_d"]

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32)
                * scale).to(dtype)

    hidden = randn(n, d).requires_grad_()
    weight = randn(vocab, d, scale=d ** -0.5).requires_grad_()
    t_hidden, t_weight = randn(n, t_d), randn(vocab, t_d, scale=t_d ** -0.5)
    with torch.no_grad():
        teacher = t_hidden @ t_weight.t()
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    labels[::16] = -100  # some padding
    kw = dict(alpha=ALPHA, temperature=TAU, divergence="reverse_kl")

    def step(loss_fn):
        def run():
            loss = loss_fn()
            loss.backward()
            hidden.grad = weight.grad = None  # so every run starts from the inputs alone
            return loss.detach()
        return run

    methods = {
        "torch": lambda: reference.distill_loss(hidden, weight, teacher, labels, **kw),
        "fastencdec": lambda: ops.distill_loss(hidden, weight, teacher, labels, **kw),
        "fastencdec (teacher hidden)": lambda: ops.distill_loss_from_teacher_hidden(
            hidden, weight, t_hidden, t_weight, labels, **kw),
    }
    liger, liger_note = liger_loss()
    if liger is not None:
        methods["liger JSD beta=1"] = lambda: liger(hidden, weight, t_hidden, t_weight, labels)

    rows, losses = [], {}
    for name, fn in methods.items():
        try:
            losses[name] = float(step(fn)())
            ms, peak = measure(step(fn), device, iters)
        except Exception as exc:  # e.g. out of memory, or an incompatible Liger version
            rows.append(dict(method=name, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        rows.append(dict(method=name, ms=ms, peak_mib=None if peak is None else peak / 2**20,
                         loss=losses[name]))
    base = next((r for r in rows if r["method"] == "torch" and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["speedup_vs_torch"] = base["ms"] / r["ms"]
            if r["peak_mib"] is not None and base["peak_mib"]:
                r["memory_vs_torch"] = r["peak_mib"] / base["peak_mib"]

    device_name = torch.cuda.get_device_name(device) if on_gpu else (
        f"cpu ({platform.processor() or platform.machine()}), Triton interpreter")
    smoke = "" if on_gpu else " (smoke run: numbers mean nothing)"
    print(f"device: {device_name}; N={n} d={d} V={vocab} {str(dtype)[6:]} alpha={ALPHA} "
          f"tau={TAU}; forward + backward{smoke}")
    print(f"{'method':<30}{'ms':>10}{'x torch':>9}{'peak MiB':>10}{'mem/torch':>11}{'loss':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<30}  failed: {r['error']}")
            continue
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mem = f"{r['memory_vs_torch']:.2f}" if "memory_vs_torch" in r else "-"
        print(f"{r['method']:<30}{r['ms']:>10.3f}{r.get('speedup_vs_torch', 0):>9.2f}"
              f"{peak:>10}{mem:>11}{r['loss']:>10.4f}")
    if liger_note:
        print(liger_note)

    result = dict(benchmark="distill_loss", device=device_name, smoke=not on_gpu,
                  torch=torch.__version__, triton=triton.__version__, dtype=str(dtype)[6:],
                  shape=shape, alpha=ALPHA, temperature=TAU, iters=iters, rows=rows,
                  liger_note=liger_note)
    out = args.out or RESULTS_DIR / f"distill_loss-{'cuda' if on_gpu else 'cpu-smoke'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
