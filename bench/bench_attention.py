"""Benchmark fastencdec's fused RoPE + GQA attention (Triton) against
- SDPA: PyTorch RoPE on q/k, K/V repeated to every query head, then
  ``scaled_dot_product_attention`` on the flash backend (what a plain model does);
- flex: the same PyTorch RoPE, then compiled FlexAttention with ``enable_gqa`` and a
  causal block mask (no K/V repeat).
Each baseline's RoPE and repeat are timed with it. Forward, and forward + backward.

On a CUDA machine: bf16, B*L = 16k tokens, L in {512, 1024, 2048, 4096}, D in
{64, 128}, Hq/Hkv in {16/4, 6/3}, causal and not; CUDA-event medians after warmup
(the first call autotunes / compiles). TFLOP/s count the attention matmuls only
(forward 4*B*Hq*Lq*Lk*D, halved when causal; backward 2.5x the forward), padded
keys included. ``--padding`` gives every batch row a random length in [L/2, L]:
a key padding mask for fastencdec, a boolean mask for SDPA (which then cannot use
the flash backend) and a padding block mask for flex.
Without CUDA (or with ``--device cpu``) it runs one tiny fp32 shape through the
Triton interpreter: a smoke test, its times mean nothing.

    python bench/bench_attention.py [--device cuda|cpu] [--padding] [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--padding", action="store_true",
                        help="right-pad every batch row to a random length in [L/2, L] "
                             "(SDPA then needs a mask: memory-efficient backend, not flash)")
    args = parser.parse_args()
    if args.device is None or (args.device == "cuda" and not torch.cuda.is_available()):
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats is None:
        args.repeats = 30 if args.device == "cuda" else 2
    return args


ARGS = parse_args()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
os.environ["FASTENCDEC_BACKEND"] = "triton"

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from fastencdec import ops  # noqa: E402
from fastencdec.reference.rope import rope_inv_freq  # noqa: E402


def shapes(device: str):
    if device == "cpu":
        yield dict(batch=1, seq_len=64, n_q=4, n_kv=2, head_dim=64, causal=True)
        return
    tokens = 16 * 1024
    for seq_len, head_dim, (n_q, n_kv), causal in itertools.product(
        (512, 1024, 2048, 4096), (64, 128), ((16, 4), (6, 3)), (False, True)
    ):
        yield dict(batch=tokens // seq_len, seq_len=seq_len, n_q=n_q, n_kv=n_kv,
                   head_dim=head_dim, causal=causal)


# --------------------------------------------------------------------------- implementations


class TorchRope:
    """Rotate-half RoPE as a PyTorch model does it: cos/sin cached once per shape."""

    def __init__(self, seq_len, head_dim, device, dtype):
        angles = torch.arange(seq_len, device=device, dtype=torch.float64)[:, None] \
            * rope_inv_freq(head_dim, 10000.0, device=device)
        angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]  # [1, L, 1, D]
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def __call__(self, x):  # x [B, L, H, D]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rotated * self.sin


def key_lengths(shape):
    """Real keys per batch row: all of them, or (``--padding``) a random L/2..L."""
    batch, seq_len = shape["batch"], shape["seq_len"]
    if not ARGS.padding:
        return None
    return torch.randint(seq_len // 2, seq_len + 1, (batch,), device=ARGS.device)


def fastencdec_impl(shape, lengths):
    mask = None
    if lengths is not None:
        mask = torch.arange(shape["seq_len"], device=ARGS.device)[None, :] < lengths[:, None]

    def run(q, k, v):
        return ops.self_attention(q, k, v, causal=shape["causal"], key_padding_mask=mask)
    return run


def sdpa_impl(shape, rope, lengths):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = shape["n_q"] // shape["n_kv"]
    backend = SDPBackend.FLASH_ATTENTION if ARGS.device == "cuda" else SDPBackend.MATH
    allowed = None
    if lengths is not None:  # flash takes no mask: a boolean mask, memory-efficient backend
        idx = torch.arange(shape["seq_len"], device=ARGS.device)
        allowed = (idx[None, None, None, :] < lengths[:, None, None, None])
        if shape["causal"]:
            allowed = allowed & (idx[:, None] >= idx[None, :])
        if ARGS.device == "cuda":
            backend = SDPBackend.EFFICIENT_ATTENTION

    def run(q, k, v):
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
                is_causal=shape["causal"] and allowed is None)
        return out.transpose(1, 2)
    return run


def flex_impl(shape, rope, lengths):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    causal = shape["causal"]

    def visible(b, h, q_idx, kv_idx):
        ok = kv_idx < lengths[b] if lengths is not None else kv_idx >= 0
        return ok & (q_idx >= kv_idx) if causal else ok

    block_mask = None
    if causal or lengths is not None:
        seq_len = shape["seq_len"]
        batch = shape["batch"] if lengths is not None else None
        block_mask = create_block_mask(visible, batch, None, seq_len, seq_len,
                                       device=ARGS.device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        q, k = rope(q), rope(k)
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   block_mask=block_mask, enable_gqa=True)
        return out.transpose(1, 2)
    return run


# --------------------------------------------------------------------------- timing


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if ARGS.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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


def attention_flops(shape, mode: str) -> float:
    fwd = 4.0 * shape["batch"] * shape["n_q"] * shape["seq_len"] ** 2 * shape["head_dim"]
    if shape["causal"]:
        fwd /= 2
    return fwd if mode == "fwd" else 3.5 * fwd


def measure(impl, shape, dtype, mode: str) -> float:
    batch, seq_len, head_dim = shape["batch"], shape["seq_len"], shape["head_dim"]
    kw = dict(device=ARGS.device, dtype=dtype)
    q = torch.randn(batch, seq_len, shape["n_q"], head_dim, **kw)
    k = torch.randn(batch, seq_len, shape["n_kv"], head_dim, **kw)
    v = torch.randn(batch, seq_len, shape["n_kv"], head_dim, **kw)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                impl(q, k, v)
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grad_out = torch.randn_like(q)

        def step():
            torch.autograd.grad(impl(q, k, v), (q, k, v), grad_out)
    return median_ms(step, ARGS.warmup, ARGS.repeats)


def main():
    on_gpu = ARGS.device == "cuda"
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)"
    dtype = torch.bfloat16 if ARGS.device == "cuda" else torch.float32
    rows = []
    header = (f"{'B':>3} {'L':>5} {'Hq/Hkv':>6} {'D':>4} {'causal':>6} {'mode':>7} | "
              f"{'ours ms':>8} {'TFLOP/s':>7} | {'sdpa ms':>8} {'x':>5} | {'flex ms':>8} {'x':>5}")
    padding = ", right padding (L/2..L real keys)" if ARGS.padding else ""
    print(f"attention benchmark on {device_name}, {str(dtype)[6:]}{padding}")
    print(header)
    print("-" * len(header))
    for shape in shapes(ARGS.device):
        rope = TorchRope(shape["seq_len"], shape["head_dim"], ARGS.device, dtype)
        lengths = key_lengths(shape)
        impls = {"fastencdec": fastencdec_impl(shape, lengths),
                 "sdpa": sdpa_impl(shape, rope, lengths)}
        if on_gpu:
            impls["flex"] = flex_impl(shape, rope, lengths)
        for mode in ("fwd", "fwd+bwd"):
            row = dict(shape, mode=mode, dtype=str(dtype)[6:], padding=ARGS.padding,
                       flops=attention_flops(shape, mode))
            for name, impl in impls.items():
                try:
                    row[f"{name}_ms"] = measure(impl, shape, dtype, mode)
                except Exception as exc:  # a baseline that cannot run here is reported, not fatal
                    row[f"{name}_ms"] = None
                    row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(format_row(row), flush=True)
    write_json(rows, device_name, dtype)


def format_row(row) -> str:
    def ms(name):
        value = row.get(f"{name}_ms")
        return f"{value:8.3f}" if value else f"{'n/a':>8}"

    def ratio(name):
        ours, other = row.get("fastencdec_ms"), row.get(f"{name}_ms")
        return f"{other / ours:5.2f}" if ours and other else f"{'-':>5}"

    ours = row.get("fastencdec_ms")
    tflops = f"{row['flops'] / ours / 1e9:7.1f}" if ours else f"{'-':>7}"
    return (f"{row['batch']:>3} {row['seq_len']:>5} {row['n_q']:>3}/{row['n_kv']:<2} "
            f"{row['head_dim']:>4} {str(row['causal']):>6} {row['mode']:>7} | "
            f"{ms('fastencdec')} {tflops} | {ms('sdpa')} {ratio('sdpa')} | "
            f"{ms('flex')} {ratio('flex')}")


def write_json(rows, device_name: str, dtype) -> None:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    kind = "attention_padded" if ARGS.padding else "attention"
    out = ARGS.out or RESULTS_DIR / f"{kind}_{slug}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for name in ("fastencdec", "sdpa", "flex"):
            if row.get(f"{name}_ms"):
                row[f"{name}_tflops"] = row["flops"] / row[f"{name}_ms"] / 1e9
    meta = dict(
        benchmark="attention", device=device_name, date=stamp, dtype=str(dtype)[6:],
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        repeats=ARGS.repeats, warmup=ARGS.warmup, argv=sys.argv[1:],
        note="ratios = baseline time / fastencdec time (> 1: fastencdec is faster)",
    )
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
