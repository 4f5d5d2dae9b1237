"""Benchmark the Triton decode kernels: cache decode (``ops.decode_attention``'s kernel,
one new token against a full KV cache) and cross-attention decode (static encoder K/V
with a key mask), and the KV-cache append.

For each shape: median kernel time (CUDA events, L2 flushed before every timed run),
achieved bandwidth (bytes of K/V read + q/out written, + the mask in cross mode) as a
fraction of a device-to-device ``copy_`` measured in the same run, and the speed-up
over PyTorch SDPA with K/V repeated to every query head (the repeat is timed too: it
is what a plain PyTorch decode step pays). Goal (issue 12): >= 80% of copy bandwidth.

Presets (CUDA, bf16): ``full``: B {1, 8, 32} x Hq/Hkv {16/4, 6/3} x D {64, 128} x Lk
{512, 2048, 8192}; ``suite`` (``bench/gpu_bench.sh``, ~30 s): B {1, 32} x 16/4 x D
{64, 128} x Lk {2048, 8192}. Without CUDA: one tiny fp32 shape through the Triton
interpreter (a smoke test; the record says its numbers mean nothing).

    python bench/bench_decode.py [--preset full|suite] [--repeats N]
                                 [--results-dir DIR | --out FILE]
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402

GOAL_FRACTION_OF_COPY = 0.8


def parse_args(argv=None):
    p = harness.device_parser(__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("full", "suite"), default="full")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point")
    return harness.parse_device_args(p, argv, repeats=(50, 2))


def shapes(device: str, preset: str):
    if device == "cpu":
        yield dict(batch=1, n_q=6, n_kv=3, head_dim=64, key_len=128)
        return
    if preset == "full":
        grid = itertools.product((1, 8, 32), ((16, 4), (6, 3)), (64, 128), (512, 2048, 8192))
    else:
        grid = itertools.product((1, 32), ((16, 4),), (64, 128), (2048, 8192))
    for batch, (n_q, n_kv), head_dim, key_len in grid:
        yield dict(batch=batch, n_q=n_q, n_kv=n_kv, head_dim=head_dim, key_len=key_len)


def copy_bandwidth_gbs(device, timer) -> float | None:
    """Device-to-device ``copy_`` of 1 GiB: bytes read + written per second."""
    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src)).median
    return 2 * src.numel() / seconds / 1e9


def sdpa_decode(q, k, v, mask):
    """Plain PyTorch: repeat K/V to every query head, then SDPA."""
    import torch.nn.functional as F

    group = q.shape[2] // k.shape[2]
    kr = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vr = v.repeat_interleave(group, dim=2).transpose(1, 2)
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr,
                                          attn_mask=attn_mask).transpose(1, 2)


def bench_shape(shape, mode, dtype, args, timer, sm_count):
    from fastencdec.kernels import append_kv_cache as append
    from fastencdec.kernels import decode_attention as decode

    b, n_q, n_kv, d, lk = (shape[k] for k in ("batch", "n_q", "n_kv", "head_dim", "key_len"))
    kw = dict(device=args.device, dtype=dtype)
    q = torch.randn(b, 1, n_q, d, **kw)
    k = torch.randn(b, lk, n_kv, d, **kw)
    v = torch.randn(b, lk, n_kv, d, **kw)
    elt = q.element_size()
    row = dict(mode=mode, dtype=str(dtype)[6:], **shape)
    if mode == "append":
        lens = torch.full((b,), lk - 1, device=args.device, dtype=torch.int32)
        kn, vn = torch.randn(b, 1, n_kv, d, **kw), torch.randn(b, 1, n_kv, d, **kw)
        turns = torch.rand(d // 2, dtype=torch.float64, device=args.device)
        run = lambda: append.append_kv_cache(q, kn, vn, k, v, lens, turns)  # noqa: E731
        row["bytes"] = (2 * q.numel() + 4 * kn.numel()) * elt
        row["ms"] = timer(run).median * 1e3
        return row
    if mode == "decode":
        lens = torch.full((b,), lk, device=args.device, dtype=torch.int32)  # full caches
        mask = None
        run = lambda: decode.decode_attention(q, k, v, seqlens=lens,  # noqa: E731
                                              sm_count=sm_count)
    else:
        mask = torch.ones(b, lk, device=args.device, dtype=torch.bool)
        run = lambda: decode.decode_attention(q, k, v, key_mask=mask,  # noqa: E731
                                              sm_count=sm_count)
    row["bytes"] = (k.numel() + v.numel() + 2 * q.numel()) * elt + (mask.numel() if mask
                                                                   is not None else 0)
    cfg = decode.tile_config(d, n_q // n_kv, 1)
    m_tiles = -(-(n_q // n_kv) // cfg["BLOCK_M"])
    row["splits"] = decode.choose_num_splits(b * n_kv * m_tiles, lk, cfg["BLOCK_N"], sm_count)
    row["max_abs_diff_vs_sdpa"] = float((run().float() - sdpa_decode(q, k, v, mask).float())
                                        .abs().max())
    timings = {"ours": timer(run), "sdpa": timer(lambda: sdpa_decode(q, k, v, mask))}
    row["ms"] = timings["ours"].median * 1e3
    row["sdpa_ms"] = timings["sdpa"].median * 1e3
    row["x_sdpa"] = row["sdpa_ms"] / row["ms"]
    return row


COLUMNS = [harness.Column("mode", "mode"), harness.Column("batch", "B"),
           harness.Column("n_q", "Hq"), harness.Column("n_kv", "Hkv"),
           harness.Column("head_dim", "D"), harness.Column("key_len", "Lk"),
           harness.Column("splits", "splits"), harness.Column("ms", "ms", ".4f"),
           harness.Column("gbs", "GB/s", ".0f"), harness.Column("frac_of_copy", "of copy", ".0%"),
           harness.Column("sdpa_ms", "sdpa ms", ".4f"), harness.Column("x_sdpa", "x sdpa", ".2f")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    run = harness.Run("decode", device=args.device, out=args.out, results_dir=args.results_dir)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    timer = harness.Timer(warmup=3, repeats=args.repeats, device=args.device,
                          l2_flush_bytes=(256 << 20) if args.device == "cuda" else 0)
    copy_gbs = copy_bandwidth_gbs(args.device, timer)
    sm_count = (torch.cuda.get_device_properties(0).multi_processor_count
                if args.device == "cuda" else 8)
    print(f"decode on {run.meta['device_name']}, {str(dtype)[6:]}; copy_ bandwidth "
          + (f"{copy_gbs:.0f} GB/s" if copy_gbs else "n/a"), flush=True)
    rows, interrupted = [], None

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        for shape in shapes(args.device, args.preset):
            for mode in ("decode", "cross", "append"):
                row = bench_shape(shape, mode, dtype, args, timer, sm_count)
                row["gbs"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
                row["frac_of_copy"] = row["gbs"] / copy_gbs if copy_gbs else None
                rows.append(row)
                print(harness.format_table([row], COLUMNS).splitlines()[-1], flush=True)
    except KeyboardInterrupt as exc:  # a timeout: keep what was measured
        interrupted = str(exc) or "interrupted"
        print(f"stopped ({interrupted}); writing the {len(rows)} rows measured", flush=True)
    if rows:
        print(harness.format_table(rows, COLUMNS))
    decode_rows = [r for r in rows if r["mode"] == "decode" and r["frac_of_copy"] is not None]
    best = max((r["frac_of_copy"] for r in decode_rows), default=None)
    goal = {"value_best": best, "goal": GOAL_FRACTION_OF_COPY,
            "met": None if best is None else best >= GOAL_FRACTION_OF_COPY}
    if best is not None:
        print(f"goal decode >= {GOAL_FRACTION_OF_COPY:.0%} of copy bandwidth: best {best:.0%} "
              f"{'met' if goal['met'] else 'NOT met'}")
    path = run.finish({"preset": args.preset, "repeats": args.repeats,
                       "copy_bandwidth_gbs": copy_gbs, "sm_count": sm_count, "goal": goal,
                       "interrupted": interrupted, "rows": rows})
    print(f"wrote {path}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
