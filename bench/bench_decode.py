"""Benchmark the Triton decode kernels (cache decode and cross-attention decode).

For each shape: median kernel time (CUDA events, L2 flushed before every timed
run), achieved bandwidth (bytes of K/V read + q/out, + the mask in cross mode)
against a device-to-device ``copy_`` measured in the same run, and the speed-up
over PyTorch SDPA with K/V repeated to all query heads (the repeat is timed too:
it is what a plain PyTorch decode step pays).

On a CUDA machine: B in {1, 8, 32}, Hq/Hkv 16/4 and 6/3, D 64/128, Lk in
{512, 2048, 8192}, bf16, one new token. Without CUDA it runs one tiny fp32 shape
through the Triton interpreter (a smoke test; its times mean nothing).

    python bench/bench_decode.py [--iters N] [--out bench/results/NAME.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from fastencdec.ops import triton_decode  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def gpu_shapes():
    for batch, (n_q, n_kv), head_dim, key_len in itertools.product(
        (1, 8, 32), ((16, 4), (6, 3)), (64, 128), (512, 2048, 8192)
    ):
        yield dict(batch=batch, n_q=n_q, n_kv=n_kv, head_dim=head_dim, key_len=key_len, t_new=1)


def cpu_shapes():
    yield dict(batch=1, n_q=6, n_kv=3, head_dim=64, key_len=128, t_new=1)


class Timer:
    """Median wall time of ``fn`` in ms: CUDA events with an L2 flush before each
    run on the GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device, iters: int):
        self.device, self.iters = device, iters
        self.flush = (torch.empty(256 << 20, dtype=torch.uint8, device=device)
                      if device.type == "cuda" else None)

    def __call__(self, fn) -> float:
        fn()  # compile / warm up
        times = []
        for _ in range(self.iters):
            if self.flush is not None:
                self.flush.zero_()
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
        return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, timer: Timer) -> float | None:
    """Device-to-device ``copy_`` of 1 GiB: bytes read + written per second."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def sdpa_reference(q, k, v, mask):
    """Plain PyTorch: repeat K/V to every query head, then SDPA."""
    group = q.shape[2] // k.shape[2]
    kr = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vr = v.repeat_interleave(group, dim=2).transpose(1, 2)
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=attn_mask)


def bench_shape(shape, mode, dtype, device, timer):
    b, n_q, n_kv, d, lk, t = (shape[k] for k in
                              ("batch", "n_q", "n_kv", "head_dim", "key_len", "t_new"))
    q = torch.randn(b, t, n_q, d, device=device, dtype=dtype)
    k = torch.randn(b, lk, n_kv, d, device=device, dtype=dtype)
    v = torch.randn(b, lk, n_kv, d, device=device, dtype=dtype)
    elt = q.element_size()
    bytes_moved = 2 * k.numel() * elt + 2 * q.numel() * elt
    if mode == "decode":
        lens = torch.full((b,), lk, device=device, dtype=torch.int32)  # full caches
        mask = None
        run = lambda: triton_decode.decode_attention(q, k, v, lens)
    else:
        mask = torch.ones(b, lk, device=device, dtype=torch.bool)
        bytes_moved += mask.numel()
        run = lambda: triton_decode.cross_attention_decode(q, k, v, mask, None)
    err = (run().float() - sdpa_reference(q, k, v, mask).transpose(1, 2).float()).abs().max()
    ms = timer(run)
    ms_sdpa = timer(lambda: sdpa_reference(q, k, v, mask))
    return dict(mode=mode, dtype=str(dtype).replace("torch.", ""), **shape,
                ms=ms, gbs=bytes_moved / (ms * 1e-3) / 1e9, sdpa_ms=ms_sdpa,
                speedup_vs_sdpa=ms_sdpa / ms, max_abs_diff_vs_sdpa=float(err))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=None, help="timed runs per shape")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32  # bf16 tl.dot is broken in the interpreter
    timer = Timer(device, args.iters or (50 if on_gpu else 2))
    copy_gbs = copy_bandwidth_gbs(device, timer)
    device_name = torch.cuda.get_device_name(device) if on_gpu else (
        f"cpu ({platform.processor() or platform.machine()}), Triton interpreter")

    rows = []
    for shape in (gpu_shapes() if on_gpu else cpu_shapes()):
        for mode in ("decode", "cross"):
            row = bench_shape(shape, mode, dtype, device, timer)
            row["frac_of_copy_bw"] = row["gbs"] / copy_gbs if copy_gbs else None
            rows.append(row)

    header = (f"{'mode':<7}{'B':>4}{'Hq/Hkv':>8}{'D':>5}{'Lk':>6}{'ms':>10}{'GB/s':>9}"
              f"{'%copy':>7}{'sdpa ms':>10}{'x sdpa':>8}")
    print(f"device: {device_name}; copy_ bandwidth: "
          + (f"{copy_gbs:.0f} GB/s" if copy_gbs else "n/a (no GPU)"))
    print(header)
    for r in rows:
        frac = f"{100 * r['frac_of_copy_bw']:.0f}" if r["frac_of_copy_bw"] else "-"
        print(f"{r['mode']:<7}{r['batch']:>4}{r['n_q']:>4}/{r['n_kv']:<3}{r['head_dim']:>5}"
              f"{r['key_len']:>6}{r['ms']:>10.4f}{r['gbs']:>9.1f}{frac:>7}"
              f"{r['sdpa_ms']:>10.4f}{r['speedup_vs_sdpa']:>8.2f}")

    result = dict(
        benchmark="decode_attention", device=device_name, smoke=not on_gpu,
        torch=torch.__version__, triton=triton.__version__,
        copy_bandwidth_gbs=copy_gbs, iters=timer.iters, rows=rows,
    )
    out = args.out or RESULTS_DIR / f"decode-{'cuda' if on_gpu else 'cpu-smoke'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
