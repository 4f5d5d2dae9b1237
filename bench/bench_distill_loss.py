"""Benchmark the fused distillation loss (LM head + reverse KL + CE), forward + backward.

Rows (peak memory over the inputs, median time of forward + backward):
- ``torch``: plain PyTorch (``fastencdec.reference``): lm_head -> fp32 log_softmax ->
  KL + CE, every ``[N, V]`` intermediate materialised; teacher logits given.
- ``fastencdec``: ``ops.distill_loss`` (chunked LM head + Triton row kernel); teacher
  logits given.
- ``fastencdec (teacher hidden)``: ``ops.distill_loss_from_teacher_hidden``: the
  teacher's LM head is fused too (teacher hidden states + head weight given).
- ``liger JSD beta=1``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked; beta=1 is
  reverse KL; hard-loss weight 1 - alpha) when ``liger_kernel`` imports; it takes
  teacher hidden states, so it compares with the "teacher hidden" row.

Goals (issue 12): fastencdec's peak memory <= 1/4 of torch's; >= 1.5x Liger's speed.
CUDA: N=8192, d=1024, V=32128 (mu-330m's head), bf16. Without CUDA a tiny fp32 shape
runs through the Triton interpreter (a smoke test; the record says so).

    python bench/bench_distill_loss.py [--iters N] [--results-dir DIR | --out FILE]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402

GPU_SHAPE = dict(n=8192, d=1024, vocab=32128, teacher_d=1024)
CPU_SHAPE = dict(n=64, d=32, vocab=500, teacher_d=48)
ALPHA, TAU = 0.5, 1.0
GOALS = {"memory_vs_torch": 0.25, "x_liger": 1.5}


def parse_args(argv=None):
    p = harness.device_parser(__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=None, help="timed runs per row")
    return harness.parse_device_args(p, argv, iters=(10, 1))


def liger_loss():
    """(Liger's chunked fused-linear JSD with beta=1, or None; a note on why not)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA,
                                     beta=1.0, temperature=TAU)
    except Exception as exc:  # noqa: BLE001 - not installed, or an incompatible version
        return None, f"no Liger row ({type(exc).__name__}: {exc})"[:200]

    def run(h, w, th, tw, labels):
        try:
            return fn(h, w, th, tw, labels)
        except TypeError:  # newer versions take student/teacher biases too
            return fn(h, w, th, tw, labels, None, None)

    return run, None


def peak_bytes(fn, device) -> int | None:
    """Peak memory allocated during one ``fn()`` above what was allocated before it."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


COLUMNS = [harness.Column("method", "method"), harness.Column("ms", "ms", ".3f"),
           harness.Column("x_torch", "x torch", ".2f"),
           harness.Column("peak_mib", "peak MiB", ".0f"),
           harness.Column("memory_vs_torch", "mem/torch", ".3f"),
           harness.Column("loss", "loss", ".5f"), harness.Column("error", "error")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    os.environ["FASTENCDEC_BACKEND"] = "triton"
    run = harness.Run("distill_loss", device=args.device, out=args.out,
                      results_dir=args.results_dir, packages=("liger-kernel",))
    from fastencdec import ops, reference

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = GPU_SHAPE if args.device == "cuda" else CPU_SHAPE
    n, d, vocab, t_d = shape["n"], shape["d"], shape["vocab"], shape["teacher_d"]
    gen = torch.Generator(device=args.device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=args.device) * scale).to(dtype)

    hidden = randn(n, d).requires_grad_()
    weight = randn(vocab, d, scale=d ** -0.5).requires_grad_()
    t_hidden, t_weight = randn(n, t_d), randn(vocab, t_d, scale=t_d ** -0.5)
    with torch.no_grad():
        teacher = t_hidden @ t_weight.t()
    labels = torch.randint(0, vocab, (n,), generator=gen, device=args.device)
    labels[::16] = -100  # some padding
    kw = dict(alpha=ALPHA, temperature=TAU, divergence="reverse_kl")

    def step(loss_fn):
        def go():
            loss = loss_fn()
            loss.backward()
            hidden.grad = weight.grad = None  # every run starts from the inputs alone
            return loss.detach()
        return go

    methods = {
        "torch": lambda: reference.distill_loss(hidden, weight, teacher, labels, **kw),
        "fastencdec": lambda: ops.distill_loss(hidden, weight, teacher, labels, **kw),
        "fastencdec (teacher hidden)": lambda: ops.distill_loss_from_teacher_hidden(
            hidden, weight, t_hidden, t_weight, labels, **kw),
    }
    liger, liger_note = liger_loss()
    if liger is not None:
        methods["liger JSD beta=1"] = lambda: liger(hidden, weight, t_hidden, t_weight, labels)

    timer = harness.Timer(warmup=1, repeats=args.iters, device=args.device)
    rows = []
    for name, fn in methods.items():
        row = {"method": name}
        try:
            row["loss"] = float(step(fn)())  # also the warm-up (compiles)
            row["peak_mib"] = (lambda b: None if b is None else b / 2**20)(
                peak_bytes(step(fn), args.device))
            row["ms"] = timer(step(fn)).median * 1e3
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory, an old Liger
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(harness.format_table([row], COLUMNS).splitlines()[-1], flush=True)
    base = next((r for r in rows if r["method"] == "torch" and "ms" in r), None)
    liger_row = next((r for r in rows if r["method"].startswith("liger") and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["x_torch"] = base["ms"] / r["ms"]
            if r.get("peak_mib") is not None and base.get("peak_mib"):
                r["memory_vs_torch"] = r["peak_mib"] / base["peak_mib"]
        if liger_row and "ms" in r:
            r["x_liger"] = liger_row["ms"] / r["ms"]
    print(harness.format_table(rows, COLUMNS))
    ours = next((r for r in rows if r["method"] == "fastencdec (teacher hidden)"), {})
    plain = next((r for r in rows if r["method"] == "fastencdec"), {})
    values = {"memory_vs_torch": plain.get("memory_vs_torch"), "x_liger": ours.get("x_liger")}
    goals = {k: {"value": v, "goal": GOALS[k],
                 "met": None if v is None else (v <= GOALS[k] if k == "memory_vs_torch"
                                                else v >= GOALS[k])}
             for k, v in values.items()}
    for key, g in goals.items():
        if g["value"] is not None:
            print(f"goal {key}: {g['value']:.3f} (goal {'<=' if key.startswith('memory') else '>='}"
                  f" {g['goal']}) {'met' if g['met'] else 'NOT met'}")
    if liger_note:
        print(liger_note)
    path = run.finish({"shape": shape, "dtype": str(dtype)[6:], "alpha": ALPHA,
                       "temperature": TAU, "iters": args.iters, "goals": goals, "rows": rows,
                       "liger_note": liger_note})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
