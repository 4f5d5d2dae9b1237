"""Per-call cost of the ops layer on the CPU: ``fastencdec.ops.<op>`` against the raw
C++ call (``fastencdec._C``) it ends in, at mu-330m decode shapes.

Three timings per op, interleaved (one call each in turn, so load changes hit all):
- ``raw views``: ``_C.<op>`` with every numpy view and the output made beforehand
  (the kernel plus pybind11's argument checks);
- ``raw tensors``: what any caller holding torch tensors must do at least: take the
  numpy views, allocate the output, call ``_C``;
- ``op``: the public op (checks, dispatch, the backend adapter, the same ``_C`` call).

The ops layer's overhead is ``op - raw tensors`` (the target: <= 5 us for
``decode_attention``); ``op - raw views`` is shown too. One thread, inference mode.

    python bench/bench_op_overhead.py [--repeats 30] [--calls 2000]
"""

from __future__ import annotations

import argparse
import math

import torch

import _harness as harness
from fastencdec import _C, ops


def _cases(seq_len: int):
    """mu-330m decode shapes: 6 query heads, 3 K/V heads of 64, batch 1, one new token."""
    q = torch.randn(1, 1, 6, 64)
    k_new, v_new = torch.randn(1, 1, 3, 64), torch.randn(1, 1, 3, 64)
    k_cache, v_cache = torch.randn(1, seq_len, 3, 64), torch.randn(1, seq_len, 3, 64)
    lens = torch.tensor([seq_len // 2], dtype=torch.int32)
    enc_k, enc_v = torch.randn(1, 512, 3, 64), torch.randn(1, 512, 3, 64)
    scale = 1.0 / math.sqrt(64)
    threads = torch.get_num_threads()
    out = torch.empty_like(q)
    views = {name: t.numpy() for name, t in dict(q=q, k_cache=k_cache, v_cache=v_cache,
                                                  lens=lens, out=out, k_new=k_new,
                                                  v_new=v_new, enc_k=enc_k, enc_v=enc_v).items()}

    def decode_raw_tensors():
        o = torch.empty_like(q)
        _C.decode_attention(q.numpy(), k_cache.numpy(), v_cache.numpy(), lens.numpy(), None,
                            o.numpy(), scale, "float32", threads)

    def append_raw_tensors():
        q_out = torch.empty_like(q)
        _C.append_kv_cache(q.numpy(), k_new.numpy(), v_new.numpy(), k_cache.numpy(),
                           v_cache.numpy(), lens.numpy(), q_out.numpy(), True, 10000.0,
                           "float32", threads)

    def cross_raw_tensors():
        o = torch.empty_like(q)
        _C.cross_attention(q.numpy(), enc_k.numpy(), enc_v.numpy(), o.numpy(), None, scale,
                           "float32", threads)

    v = views
    return {
        "decode_attention": {
            "raw views": lambda: _C.decode_attention(v["q"], v["k_cache"], v["v_cache"],
                                                     v["lens"], None, v["out"], scale,
                                                     "float32", threads),
            "raw tensors": decode_raw_tensors,
            "op": lambda: ops.decode_attention(q, k_cache, v_cache, lens),
        },
        "append_kv_cache": {
            "raw views": lambda: _C.append_kv_cache(v["q"], v["k_new"], v["v_new"],
                                                    v["k_cache"], v["v_cache"], v["lens"],
                                                    v["out"], True, 10000.0, "float32",
                                                    threads),
            "raw tensors": append_raw_tensors,
            "op": lambda: ops.append_kv_cache(q, k_new, v_new, k_cache, v_cache, lens),
        },
        "cross_attention": {
            "raw views": lambda: _C.cross_attention(v["q"], v["enc_k"], v["enc_v"], v["out"],
                                                    None, scale, "float32", threads),
            "raw tensors": cross_raw_tensors,
            "op": lambda: ops.cross_attention(q, enc_k, enc_v),
        },
    }


def _per_call(fn, calls: int):
    def batch():
        for _ in range(calls):
            fn()
    return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128, help="KV cache length")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = harness.Run("op_overhead", device="cpu", threads=1, out=args.out)
    rows = []
    with torch.inference_mode():
        for op, fns in _cases(args.seq_len).items():
            timings = harness.time_interleaved(
                {name: _per_call(fn, args.calls) for name, fn in fns.items()},
                warmup=3, repeats=args.repeats)
            us = {name: t.median / args.calls * 1e6 for name, t in timings.items()}
            rows.append({"op": op, "raw_views_us": us["raw views"],
                         "raw_tensors_us": us["raw tensors"], "op_us": us["op"],
                         "overhead_us": us["op"] - us["raw tensors"],
                         "overhead_vs_views_us": us["op"] - us["raw views"]})
    columns = [harness.Column("op", "op"),
               harness.Column("raw_views_us", "raw views (us)", ".2f"),
               harness.Column("raw_tensors_us", "raw tensors (us)", ".2f"),
               harness.Column("op_us", "op (us)", ".2f"),
               harness.Column("overhead_us", "op - raw tensors", ".2f"),
               harness.Column("overhead_vs_views_us", "op - raw views", ".2f")]
    print(harness.format_table(rows, columns))
    decode = rows[0]["overhead_us"]
    print(f"decode_attention ops-layer overhead: {decode:.2f} us per call "
          f"(target <= 5 us: {'met' if decode <= 5.0 else 'NOT met'})")
    path = run.finish({"seq_len": args.seq_len, "calls": args.calls, "rows": rows,
                       "target_overhead_us": 5.0})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
