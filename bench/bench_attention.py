"""Benchmark fastencdec's fused RoPE + GQA attention (Triton) against
- sdpa: PyTorch RoPE on q/k, K/V repeated to every query head, then
  ``scaled_dot_product_attention`` (flash backend; with ``--padding`` a boolean mask
  and the memory-efficient backend): what a plain model does;
- flex: the same PyTorch RoPE, then compiled FlexAttention with ``enable_gqa`` and a
  block mask (no K/V repeat).
Each peer's RoPE and repeat are timed with it. Forward, and forward + backward; CUDA
events, the implementations interleaved rep by rep (``_harness.time_interleaved``).

Presets (CUDA, bf16, B*L = 16k tokens):
- ``full``: L in {512, 1024, 2048, 4096} x D {64, 128} x Hq/Hkv {16/4, 6/3} x causal or
  not; flex on every shape (one compile per shape);
- ``suite`` (``bench/gpu_bench.sh``, ~2 min on an H100/H200, most of it autotuning
  compiles): Hq/Hkv 16/4 at (L, D, causal) = (4096, 128, yes) [the goal shape],
  (4096, 128, no), (4096, 64, yes), (1024, 128, yes); flex compiled once, for the goal
  shape's family.
A SIGTERM (e.g. ``timeout``) stops the run and still writes what was measured.
Without CUDA: one tiny fp32 shape through the Triton interpreter (a smoke test: the
record says its numbers mean nothing).

TFLOP/s count the attention matmuls (forward ``4 B Hq L^2 D``, halved when causal;
forward + backward 3.5x that), padded keys included. Goals (issue 12, D=128, L=4096):
forward >= 1.3x sdpa and >= 400 TFLOP/s; forward + backward >= 1.1x sdpa.

    python bench/bench_attention.py [--preset full|suite] [--padding] [--no-flex]
                                    [--repeats N] [--results-dir DIR | --out FILE]
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

GOALS = {"fwd_vs_sdpa": 1.3, "fwd_tflops": 400.0, "fwd_bwd_vs_sdpa": 1.1}
GOAL_SHAPE = dict(seq_len=4096, head_dim=128)


def parse_args(argv=None):
    p = harness.device_parser(__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("full", "suite"), default="full")
    p.add_argument("--padding", action="store_true",
                   help="every batch row a random length in [L/2, L] (a key padding mask)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point")
    p.add_argument("--warmup", type=int, default=3)
    return harness.parse_device_args(p, argv, repeats=(20, 2))


def shapes(device: str, preset: str):
    if device == "cpu":
        yield dict(batch=1, seq_len=64, n_q=4, n_kv=2, head_dim=64, causal=True)
        return
    tokens = 16 * 1024
    if preset == "full":
        grid = itertools.product((512, 1024, 2048, 4096), (64, 128), ((16, 4), (6, 3)),
                                 (False, True))
    else:
        grid = [(4096, 128, (16, 4), True), (4096, 128, (16, 4), False),
                (4096, 64, (16, 4), True), (1024, 128, (16, 4), True)]
    for seq_len, head_dim, (n_q, n_kv), causal in grid:
        yield dict(batch=tokens // seq_len, seq_len=seq_len, n_q=n_q, n_kv=n_kv,
                   head_dim=head_dim, causal=causal)


# --------------------------------------------------------------------------- implementations


class TorchRope:
    """Rotate-half RoPE as a PyTorch model does it: cos/sin cached once per shape."""

    def __init__(self, seq_len, head_dim, device, dtype):
        from fastencdec.spec import rope_inv_freq

        angles = torch.arange(seq_len, device=device, dtype=torch.float64)[:, None] \
            * rope_inv_freq(head_dim, 10000.0, device=device)
        angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]  # [1, L, 1, D]
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def __call__(self, x):  # x [B, L, H, D]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rotated * self.sin


def key_lengths(shape, args):
    if not args.padding:
        return None
    return torch.randint(shape["seq_len"] // 2, shape["seq_len"] + 1, (shape["batch"],),
                         device=args.device)


def fastencdec_impl(shape, lengths, args):
    from fastencdec import ops

    mask = None
    if lengths is not None:
        mask = torch.arange(shape["seq_len"], device=args.device)[None, :] < lengths[:, None]

    def run(q, k, v):
        return ops.self_attention(q, k, v, causal=shape["causal"], key_padding_mask=mask)
    return run


def sdpa_impl(shape, rope, lengths, args):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = shape["n_q"] // shape["n_kv"]
    backend = SDPBackend.FLASH_ATTENTION if args.device == "cuda" else SDPBackend.MATH
    allowed = None
    if lengths is not None:  # flash takes no mask: a boolean mask, memory-efficient backend
        idx = torch.arange(shape["seq_len"], device=args.device)
        allowed = idx[None, None, None, :] < lengths[:, None, None, None]
        if shape["causal"]:
            allowed = allowed & (idx[:, None] >= idx[None, :])
        if args.device == "cuda":
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


_FLEX: dict[tuple, object] = {}


def flex_impl(shape, rope, lengths, args):
    """FlexAttention compiled once per family (head_dim, causal, padding)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    causal = shape["causal"]
    family = (shape["head_dim"], causal, lengths is not None)
    if family not in _FLEX:
        _FLEX[family] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX[family]

    def visible(b, h, q_idx, kv_idx):
        ok = kv_idx < lengths[b] if lengths is not None else kv_idx >= 0
        return ok & (q_idx >= kv_idx) if causal else ok

    block_mask = None
    if causal or lengths is not None:
        seq_len = shape["seq_len"]
        batch = shape["batch"] if lengths is not None else None
        block_mask = create_block_mask(visible, batch, None, seq_len, seq_len,
                                       device=args.device)

    def run(q, k, v):
        q, k = rope(q), rope(k)
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   block_mask=block_mask, enable_gqa=True)
        return out.transpose(1, 2)
    return run


def flex_wanted(shape, args) -> bool:
    if args.no_flex or args.device != "cuda":
        return False
    return args.preset == "full" or (shape["seq_len"] == GOAL_SHAPE["seq_len"]
                                     and shape["head_dim"] == GOAL_SHAPE["head_dim"]
                                     and shape["causal"])


# --------------------------------------------------------------------------- measuring


def attention_flops(shape, mode: str) -> float:
    fwd = 4.0 * shape["batch"] * shape["n_q"] * shape["seq_len"] ** 2 * shape["head_dim"]
    if shape["causal"]:
        fwd /= 2
    return fwd if mode == "fwd" else 3.5 * fwd


def inputs(shape, dtype, device, grad: bool):
    kw = dict(device=device, dtype=dtype)
    b, seq, d = shape["batch"], shape["seq_len"], shape["head_dim"]
    q = torch.randn(b, seq, shape["n_q"], d, **kw)
    k = torch.randn(b, seq, shape["n_kv"], d, **kw)
    v = torch.randn(b, seq, shape["n_kv"], d, **kw)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def step_fn(impl, tensors, mode: str):
    q, k, v = tensors
    if mode == "fwd":
        def step():
            with torch.no_grad():
                impl(q, k, v)
        return step
    grad_out = torch.randn_like(q)

    def step():
        torch.autograd.grad(impl(q, k, v), (q, k, v), grad_out)
    return step


def measure_shape(shape, impls, dtype, args) -> list[dict]:
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        tensors = inputs(shape, dtype, args.device, grad=mode != "fwd")
        row = dict(shape, mode=mode, dtype=str(dtype)[6:], padding=args.padding,
                   flops=attention_flops(shape, mode))
        fns = {}
        for name, impl in impls.items():
            try:  # a peer that cannot run here is reported, never fatal
                fn = step_fn(impl, tensors, mode)
                fn()  # compile / autotune outside the timing
                fns[name] = fn
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if mode == "fwd" and "sdpa" in fns:
            with torch.no_grad():
                ours = impls["fastencdec"](*tensors).float()
                theirs = impls["sdpa"](*tensors).float()
            row["max_abs_diff_vs_sdpa"] = float((ours - theirs).abs().max())
        timings = harness.time_interleaved(fns, warmup=args.warmup, repeats=args.repeats,
                                           device=args.device) if fns else {}
        for name, timing in timings.items():
            row[f"{name}_ms"] = timing.median * 1e3
            row[f"{name}_spread"] = timing.spread
            row[f"{name}_tflops"] = row["flops"] / timing.median / 1e12
        ours = row.get("fastencdec_ms")
        for peer in ("sdpa", "flex"):
            if ours and row.get(f"{peer}_ms"):
                row[f"x_{peer}"] = row[f"{peer}_ms"] / ours
        rows.append(row)
    return rows


def goals(rows) -> dict:
    """The issue's goals at D=128, L=4096, causal (None where not measured)."""
    out = {}
    for r in rows:
        if r["seq_len"] != GOAL_SHAPE["seq_len"] or r["head_dim"] != GOAL_SHAPE["head_dim"] \
                or not r["causal"] or r["padding"]:
            continue
        if r["mode"] == "fwd":
            out["fwd_vs_sdpa"] = r.get("x_sdpa")
            out["fwd_tflops"] = r.get("fastencdec_tflops")
        else:
            out["fwd_bwd_vs_sdpa"] = r.get("x_sdpa")
    return {k: {"value": out.get(k), "goal": g,
                "met": None if out.get(k) is None else out[k] >= g} for k, g in GOALS.items()}


COLUMNS = [harness.Column("batch", "B"), harness.Column("seq_len", "L"),
           harness.Column("n_q", "Hq"), harness.Column("n_kv", "Hkv"),
           harness.Column("head_dim", "D"), harness.Column("causal", "causal"),
           harness.Column("mode", "mode"), harness.Column("fastencdec_ms", "ours ms", ".3f"),
           harness.Column("fastencdec_tflops", "TFLOP/s", ".1f"),
           harness.Column("sdpa_ms", "sdpa ms", ".3f"), harness.Column("x_sdpa", "x sdpa", ".2f"),
           harness.Column("flex_ms", "flex ms", ".3f"), harness.Column("x_flex", "x flex", ".2f")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
    os.environ["FASTENCDEC_BACKEND"] = "triton"
    name = "attention_padded" if args.padding else "attention"
    run = harness.Run(name, device=args.device, out=args.out, results_dir=args.results_dir)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"{name} on {run.meta['device_name']}, {str(dtype)[6:]}, preset {args.preset}",
          flush=True)
    rows = []
    interrupted = None

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        for shape in shapes(args.device, args.preset):
            rope = TorchRope(shape["seq_len"], shape["head_dim"], args.device, dtype)
            lengths = key_lengths(shape, args)
            impls = {"fastencdec": fastencdec_impl(shape, lengths, args),
                     "sdpa": sdpa_impl(shape, rope, lengths, args)}
            if flex_wanted(shape, args):
                impls["flex"] = flex_impl(shape, rope, lengths, args)
            for row in measure_shape(shape, impls, dtype, args):
                rows.append(row)
                print(harness.format_table([row], COLUMNS).splitlines()[-1], flush=True)
    except KeyboardInterrupt as exc:  # keep what was measured
        interrupted = str(exc) or "interrupted"
        print(f"stopped ({interrupted}); writing the {len(rows)} rows measured", flush=True)
    if rows:
        print(harness.format_table(rows, COLUMNS))
    verdict = goals(rows)
    for key, g in verdict.items():
        if g["value"] is not None:
            print(f"goal {key}: {g['value']:.2f} (goal >= {g['goal']}) "
                  f"{'met' if g['met'] else 'NOT met'}")
    path = run.finish({"preset": args.preset, "repeats": args.repeats, "warmup": args.warmup,
                       "interrupted": interrupted, "goals": verdict, "rows": rows,
                       "note": "x_<peer> = peer time / fastencdec time (> 1: faster)"})
    print(f"wrote {path}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
