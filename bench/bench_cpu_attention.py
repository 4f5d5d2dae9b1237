"""C++ CPU attention kernels vs PyTorch's CPU ``scaled_dot_product_attention``.

The PyTorch side is what a user would write: RoPE in PyTorch (cos/sin tables
precomputed outside the timed region, as a model caches them), K/V heads repeated
with ``repeat_interleave`` for GQA, then SDPA. The fastencdec side calls the public
ops (``fastencdec.ops.*``, validation and dispatch included) with the C++ backend.

Shapes: prefill (B=1, L in {256, 512, 1024}, heads 6/3 and 16/4, D=64, causal and
bidirectional); decode with one new token (cache length 512 / 2048, B in {1, 8}):
the full step (RoPE + cache append + attention), attention only, and cross-attention
of one decoder token over encoder K/V of that length.

Both sides run interleaved, rep by rep, so that background load hits both alike;
the table shows medians and torch/fastencdec ratios (> 1: fastencdec is faster).
A JSON record goes to bench/results/.

    python bench/bench_cpu_attention.py [--quick] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402
from fastencdec import ops  # noqa: E402

D = 64
THETA = 10000.0


def rope_tables(n_pos: int, head_dim: int):
    """cos/sin ``[n_pos, head_dim]`` (rotate-half layout), float32."""
    inv = THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def torch_rope(x, cos, sin):
    """x ``[B, L, H, D]``, cos/sin broadcastable ``[B or 1, L, 1, D]``."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def torch_sdpa(q, k, v, *, causal=False):
    """BLHD in and out; K/V heads repeated for GQA."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    )
    return o.transpose(1, 2)


def time_pair(fn_ours, fn_torch, *, budget_s: float, min_reps: int):
    """Interleaved timings (order rotating each round): (ours, torch) ``Timing``s."""
    t = harness.time_interleaved({"ours": fn_ours, "torch": fn_torch}, warmup=2,
                                 repeats=min_reps, budget_s=budget_s, max_repeats=2000)
    return t["ours"], t["torch"]


def check_close(a, b, what):
    err = (a.float() - b.float()).abs().max().item()
    if not err < 1e-3:
        raise AssertionError(f"{what}: fastencdec and torch disagree (max abs err {err:.3g})")


def prefill_cases(quick):
    lengths = (256,) if quick else (256, 512, 1024)
    for L in lengths:
        for hq, hkv in ((6, 3), (16, 4)):
            for causal in (True, False):
                yield L, hq, hkv, causal


def bench_prefill(L, hq, hkv, causal, budget):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, L, hq, D, generator=g)
    k = torch.randn(1, L, hkv, D, generator=g)
    v = torch.randn(1, L, hkv, D, generator=g)
    cos, sin = rope_tables(L, D)
    cos, sin = cos[None, :, None], sin[None, :, None]

    def ours():
        return ops.self_attention(q, k, v, causal=causal)

    def theirs():
        return torch_sdpa(torch_rope(q, cos, sin), torch_rope(k, cos, sin), v, causal=causal)

    check_close(ours(), theirs(), f"prefill L={L}")
    return time_pair(ours, theirs, budget_s=budget, min_reps=7)


def bench_decode(kind, B, Lc, hq, hkv, budget):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, hq, D, generator=g)
    k_new = torch.randn(B, 1, hkv, D, generator=g)
    v_new = torch.randn(B, 1, hkv, D, generator=g)
    k_cache = torch.randn(B, Lc, hkv, D, generator=g)
    v_cache = torch.randn(B, Lc, hkv, D, generator=g)
    if kind == "decode step":
        # Cache holds Lc - 1 tokens; the step appends one and attends over Lc.
        lens = torch.full((B,), Lc - 1, dtype=torch.int32)
        lens_after = lens + 1
        rows = torch.arange(B)
        cos, sin = rope_tables(Lc, D)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()

        def ours():
            q_rot = ops.append_kv_cache(q, k_new, v_new, k_cache, v_cache, lens)
            return ops.decode_attention(q_rot, k_cache, v_cache, lens_after)

        def theirs():
            c = cos[lens.long()][:, None, None]  # [B, 1, 1, D]
            s = sin[lens.long()][:, None, None]
            q_rot, k_rot = torch_rope(q, c, s), torch_rope(k_new, c, s)
            k_ref[rows, lens.long()] = k_rot[:, 0]
            v_ref[rows, lens.long()] = v_new[:, 0]
            return torch_sdpa(q_rot, k_ref[:, :Lc], v_ref[:, :Lc])

    elif kind == "decode attn":
        lens = torch.full((B,), Lc, dtype=torch.int32)

        def ours():
            return ops.decode_attention(q, k_cache, v_cache, lens)

        def theirs():
            return torch_sdpa(q, k_cache, v_cache)

    else:  # cross-decode: one decoder token over static encoder K/V

        def ours():
            return ops.cross_attention(q, k_cache, v_cache)

        def theirs():
            return torch_sdpa(q, k_cache, v_cache)

    check_close(ours(), theirs(), f"{kind} B={B} L={Lc}")
    return time_pair(ours, theirs, budget_s=budget, min_reps=30)


COLUMNS = [harness.Column("kind", "kind"), harness.Column("B", "B"), harness.Column("L", "L"),
           harness.Column("heads", "heads"), harness.Column("mask", "mask"),
           harness.Column("ours_ms", "fastencdec (ms)", ".3f"),
           harness.Column("torch_ms", "torch (ms)", ".3f"),
           harness.Column("ratio", "torch / fastencdec", ".2f")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per shape")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/...)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.5)

    from fastencdec.ops import dispatch

    backend = dispatch.choose_backend("self_attention", torch.device("cpu"))
    if backend != "cpp":
        raise SystemExit(f"the C++ backend is not active for CPU tensors (got {backend!r})")

    run = harness.Run("cpu_attention", device="cpu", threads=torch.get_num_threads(),
                      out=args.out)
    rows = []

    def record(timings, **fields):
        ours, theirs = timings
        row = dict(fields, ours_ms=ours.median * 1e3, torch_ms=theirs.median * 1e3,
                   ours_min_ms=ours.min * 1e3, torch_min_ms=theirs.min * 1e3,
                   reps=len(ours.samples))
        row["ratio"] = theirs.median / ours.median
        row["ratio_of_mins"] = theirs.min / ours.min
        rows.append(row)
        print(harness.format_table([row], COLUMNS).splitlines()[-1], flush=True)

    with torch.inference_mode():
        for L, hq, hkv, causal in prefill_cases(args.quick):
            record(bench_prefill(L, hq, hkv, causal, budget), kind="prefill", B=1, L=L,
                   heads=f"{hq}/{hkv}", mask="causal" if causal else "bidir")
        for kind in ("decode step", "decode attn", "cross-decode"):
            for hq, hkv in ((6, 3), (16, 4)):
                for B in (1, 8):
                    for Lc in ((512,) if args.quick else (512, 2048)):
                        record(bench_decode(kind, B, Lc, hq, hkv, budget), kind=kind, B=B, L=Lc,
                               heads=f"{hq}/{hkv}", mask="-")
    summary = {}
    for kind in ("prefill", "decode step", "decode attn", "cross-decode"):
        ratios = [r["ratio"] for r in rows if r["kind"] == kind]
        summary[kind] = dict(min_ratio=min(ratios),
                             geomean_ratio=math.exp(sum(map(math.log, ratios)) / len(ratios)))
    print()
    print(harness.format_table(rows, COLUMNS))
    print()
    for kind, s in summary.items():
        print(f"{kind:<13} min ratio {s['min_ratio']:.2f}x  geomean {s['geomean_ratio']:.2f}x")
    path = run.finish(dict(
        head_dim=D, dtype="float32",
        timing="median of interleaved reps; ratio = torch / fastencdec (ratio_of_mins: same "
               "with the fastest reps)",
        baseline="torch RoPE (precomputed cos/sin) + repeat_interleave K/V + "
                 "F.scaled_dot_product_attention",
        rows=rows, summary=summary))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
