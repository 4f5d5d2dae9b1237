#!/usr/bin/env python
"""Generation: encoder-decoder vs decoder-only at equal parameter count.

The paper's efficiency comparison (arXiv 2501.16273): both architectures read
``--input-len`` tokens and write ``--output-len`` tokens (EOS disabled, greedy).
Measured per architecture and batch size: first-token latency, generated
tokens/s (end to end, and decode-only), peak memory (GPU: max allocated; CPU:
peak RSS of a fresh worker process per run), and analytic FLOPs per generated
sequence. Also the first-token latency as the input grows, and, where installed,
Hugging Face T5 (same dimensions) and CTranslate2 as peers.

Pairs: on CUDA ``mu-330m`` and its decoder-only twin (bf16, batch 1/8/32); on the
CPU a ~40M pair (fp32, batch 1/8) so a run takes minutes.

    python bench/bench_generate.py --device cpu
    python bench/bench_generate.py --device cuda

Prints a table and the encoder-decoder / decoder-only ratios, writes JSON to
``bench/results/bench_generate_<device>.json`` and, with matplotlib, a figure of
first-token latency vs input length next to it. Weights are random: speed and
memory do not depend on them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM
from fastencdec.models import size_encdec_to_budget
from fastencdec.ops import dispatch

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = {"encoder_decoder": (EncDecConfig, EncoderDecoderLM),
         "decoder_only": (DecoderOnlyConfig, DecoderOnlyLM)}


# -- the pair ------------------------------------------------------------------------------
def build_pair(device: str, small_params: float):
    if device == "cuda":
        encdec = EncDecConfig.preset("mu-330m")
    else:  # mu-330m's shape at ~40M: narrower, shallower, same vocabulary and 2/3 split
        encdec = size_encdec_to_budget(small_params, (2, 1), d_model=512, d_ff=2048,
                                       n_heads=8, n_kv_heads=4, head_dim=64)
    encdec = encdec.replace(dropout=0.0)
    return {"encoder_decoder": encdec, "decoder_only": DecoderOnlyConfig.twin_of(encdec)}


# -- analytic FLOPs ------------------------------------------------------------------------
def _layer_matmul_params(c, cross: bool) -> int:
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attn = c.d_model * (2 * q + 2 * kv)
    mlp = (2 if c.mlp == "gelu" else 3) * c.d_model * c.d_ff
    return attn + mlp + (c.d_model * 2 * q if cross else 0)  # cross: q and out (K/V: once)


def generation_flops(c, n_in: int, n_out: int) -> int:
    """Multiply-adds x 2 for one sequence: ``n_in`` input tokens, ``n_out`` new tokens
    (the last new token is never fed back). Attention counts QK^T and PV over the
    keys each query sees; the LM head runs once per new token."""
    width = c.n_heads * c.head_dim
    lm_head = 2 * c.d_model * c.vocab_size
    if isinstance(c, EncDecConfig):
        enc = c.n_encoder_layers * (2 * _layer_matmul_params(c, False) * n_in
                                    + 4 * n_in * n_in * width)
        cross_kv = c.n_decoder_layers * 2 * n_in * c.d_model * 2 * c.n_kv_heads * c.head_dim
        dec = sum(c.n_decoder_layers * (2 * _layer_matmul_params(c, True)
                                        + 4 * (t + 1) * width + 4 * n_in * width)
                  for t in range(n_out))  # BOS + n_out - 1 fed tokens
        return enc + cross_kv + dec + n_out * lm_head
    per_layer = 2 * _layer_matmul_params(c, False)
    prefill = c.n_layers * (per_layer * n_in + 4 * width * n_in * (n_in + 1) // 2)
    decode = sum(c.n_layers * (per_layer + 4 * (n_in + t + 1) * width) for t in range(n_out - 1))
    return prefill + decode + n_out * lm_head


# -- one measurement -----------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(arch: str, config: dict, batch: int, n_in: int, n_out: int, device: str,
            dtype: str, repeats: int, threads: int | None, lengths: list[int]) -> dict:
    """Build the model, warm up, time ``repeats`` generations; on the CPU this runs
    in a fresh process so its peak RSS belongs to this run alone."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config_cls, model_cls = ARCHS[arch]
    model = model_cls(config_cls.from_dict(config)).to(device=device, dtype=getattr(torch, dtype))
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, n_in), device=device)

    def run(inputs, new_tokens):
        stamps = []
        sync()
        start = time.perf_counter()
        model.generate(inputs, max_new_tokens=new_tokens, eos_token_id=(),
                       streamer=lambda _: stamps.append(time.perf_counter()))
        sync()
        end = time.perf_counter()
        return stamps[0] - start, end - start

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    run(ids, 4)  # warm-up: allocator, kernel compilation
    rss_before = _rss_mib() if device == "cpu" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, total = zip(*(run(ids, n_out) for _ in range(repeats)), strict=True)
    first_s, total_s = min(first), min(total)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        mem = {"peak_mem_mib": peak, "mem_kind": "cuda max_memory_allocated"}
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        # Peak RSS includes the runtime and the weights; the increment over the RSS
        # before generating is what generation itself (activations, caches) added.
        mem = {"peak_mem_mib": peak, "mem_kind": "peak RSS (process)",
               "rss_before_generate_mib": rss_before,
               "generation_mem_mib": peak - rss_before}
    curve = []
    for length in lengths:  # first-token latency vs input length, batch 1
        probe = torch.randint(3, vocab, (1, length), device=device)
        run(probe, 1)
        curve.append([length, min(run(probe, 1)[0] for _ in range(max(1, repeats)))])
    return {
        "arch": arch, "batch": batch, "input_len": n_in, "output_len": n_out,
        "params": model.num_parameters(),
        "first_token_s": first_s, "total_s": total_s,
        "tokens_per_s": batch * n_out / total_s,
        "decode_tokens_per_s": batch * (n_out - 1) / max(total_s - first_s, 1e-9),
        "flops_per_sequence": generation_flops(model.config, n_in, n_out),
        "first_token_vs_input_len": curve, **mem,
    }


def run_isolated(fn, *args):
    """Run ``fn`` in a fresh spawned process (clean peak RSS on the CPU)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


# -- peers (import-guarded) ----------------------------------------------------------------
def peer_hf_t5(c: EncDecConfig, batch, n_in, n_out, device, dtype) -> dict:
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    cfg = transformers.T5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.head_dim, d_ff=c.d_ff,
        num_layers=c.n_encoder_layers, num_decoder_layers=c.n_decoder_layers,
        num_heads=c.n_heads, feed_forward_proj="gelu_new", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=True)
    model = transformers.T5ForConditionalGeneration(cfg).to(device=device,
                                                            dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(3, c.vocab_size, (batch, n_in), device=device)

    def timed(new):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           num_beams=1)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)
    first, total = timed(1), timed(n_out)
    return {"batch": batch, "params": sum(p.numel() for p in model.parameters()),
            "first_token_s": first, "total_s": total, "tokens_per_s": batch * n_out / total,
            "note": "T5 with our dimensions: full multi-head K/V (no GQA), relative "
                    "position buckets instead of RoPE"}


def peer_ctranslate2(model_dir, batch, n_in, n_out, device) -> dict:
    try:
        import ctranslate2
    except ImportError:
        return {"skipped": "ctranslate2 is not installed"}
    if model_dir is None:
        return {"skipped": "pass --ct2-model DIR (a CTranslate2 conversion of a T5 model of "
                           "these dimensions)"}
    vocab_file = next((p for p in Path(model_dir).glob("shared_vocabulary.*")), None)
    if vocab_file is None:
        return {"skipped": f"no shared_vocabulary file in {model_dir}"}
    text = vocab_file.read_text()
    vocab = json.loads(text) if vocab_file.suffix == ".json" else text.splitlines()
    tokens = vocab[10:10 + n_in] if len(vocab) > 10 + n_in else (vocab * n_in)[:n_in]
    translator = ctranslate2.Translator(str(model_dir), device=device)
    source = [list(tokens)] * batch

    def timed(new):
        start = time.perf_counter()
        translator.translate_batch(source, beam_size=1, max_decoding_length=new,
                                   min_decoding_length=new)
        return time.perf_counter() - start

    timed(2)
    first, total = timed(1), timed(n_out)
    return {"batch": batch, "first_token_s": first, "total_s": total,
            "tokens_per_s": batch * n_out / total}


# -- report --------------------------------------------------------------------------------
def ratios(runs: list[dict]) -> dict:
    out = {}
    by = {(r["arch"], r["batch"]): r for r in runs}
    for batch in sorted({r["batch"] for r in runs}):
        ed, do = by[("encoder_decoder", batch)], by[("decoder_only", batch)]
        out[str(batch)] = {
            "first_token_latency (enc-dec / dec-only)": ed["first_token_s"] / do["first_token_s"],
            "tokens_per_s (enc-dec / dec-only)": ed["tokens_per_s"] / do["tokens_per_s"],
            "peak_mem (enc-dec / dec-only)": ed["peak_mem_mib"] / do["peak_mem_mib"],
            **({"generation_mem (enc-dec / dec-only)":
                ed["generation_mem_mib"] / max(do["generation_mem_mib"], 1e-9)}
               if "generation_mem_mib" in ed else {}),
            "flops_per_sequence (enc-dec / dec-only)":
                ed["flops_per_sequence"] / do["flops_per_sequence"],
        }
    return out


def print_table(runs, rat, peers):
    head = (f"{'arch':<16}{'batch':>6}{'params':>9}{'1st tok ms':>12}{'tok/s':>10}"
            f"{'decode tok/s':>14}{'peak MiB':>10}{'GFLOP/seq':>11}")
    print(head)
    print("-" * len(head))
    for r in runs:
        print(f"{r['arch']:<16}{r['batch']:>6}{r['params'] / 1e6:>8.1f}M"
              f"{r['first_token_s'] * 1e3:>12.1f}{r['tokens_per_s']:>10.1f}"
              f"{r['decode_tokens_per_s']:>14.1f}{r['peak_mem_mib']:>10.0f}"
              f"{r['flops_per_sequence'] / 1e9:>11.2f}")
    print("\nratios (encoder-decoder / decoder-only):")
    for batch, values in rat.items():
        print(f"  batch {batch}: " + ", ".join(f"{k.split(' ')[0]} {v:.2f}x"
                                               for k, v in values.items()))
    print("\nfirst-token latency vs input length (batch 1, ms):")
    for r in runs:
        if r["first_token_vs_input_len"]:
            pts = "  ".join(f"{n}: {s * 1e3:.1f}" for n, s in r["first_token_vs_input_len"])
            print(f"  {r['arch']:<16} {pts}")
    print("\npeers:")
    for name, result in peers.items():
        print(f"  {name}: {json.dumps(result)}")


def plot(runs, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no figure"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in runs:
        if r["first_token_vs_input_len"]:
            xs, ys = zip(*r["first_token_vs_input_len"], strict=True)
            ax.plot(xs, [y * 1e3 for y in ys], marker="o", label=r["arch"].replace("_", "-"))
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("first-token latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"figure: {path}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default: 1 8 (CPU), 1 8 32 (CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, best kept "
                   "(default 1 on the CPU, 3 on CUDA)")
    p.add_argument("--lengths", type=int, nargs="*", default=None,
                   help="input lengths for the first-token curve (default 64..512 CPU, "
                   "128..1024 CUDA)")
    p.add_argument("--small-params", type=float, default=40e6, help="CPU pair size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ct2-model", default=None, help="CTranslate2 model directory (peer)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")

    gpu = args.device == "cuda"
    batches = args.batch_sizes or ([1, 8, 32] if gpu else [1, 8])
    repeats = args.repeats or (3 if gpu else 1)
    lengths = args.lengths if args.lengths is not None else (
        [128, 256, 512, 1024] if gpu else [64, 128, 256, 512])
    dtype = "bfloat16" if gpu else "float32"
    pair = build_pair(args.device, args.small_params)
    load = os.getloadavg()[0]
    if not gpu and load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} exceeds the {os.cpu_count()} CPUs: "
              "multi-threaded timings will be dominated by waiting for cores "
              "(try --threads 1)", file=sys.stderr)

    runs = []
    for arch, config in pair.items():
        for i, batch in enumerate(batches):
            curve = lengths if i == 0 else []
            job = (arch, config.to_dict(), batch, args.input_len, args.output_len,
                   args.device, dtype, repeats, args.threads, curve)
            result = measure(*job) if gpu else run_isolated(measure, *job)
            runs.append(result)
            print(f"  {arch} batch {batch}: {result['total_s']:.2f}s", file=sys.stderr)

    peers = {}
    if args.no_peers:
        peers = {"hf_t5": {"skipped": "--no-peers"}, "ctranslate2": {"skipped": "--no-peers"}}
    else:
        peers["hf_t5"] = peer_hf_t5(pair["encoder_decoder"], batches[0], args.input_len,
                                    args.output_len, args.device, dtype)
        peers["ctranslate2"] = peer_ctranslate2(args.ct2_model, batches[0], args.input_len,
                                                args.output_len, args.device)

    rat = ratios(runs)
    print_table(runs, rat, peers)
    out = args.out or RESULTS / f"bench_generate_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    note = plot(runs, out.with_suffix(".png"))
    print(f"\n{note}")
    meta = {
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "device": args.device,
        "device_name": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "threads": args.threads or torch.get_num_threads(), "dtype": dtype,
        "load_average_at_start": load, "cpu_count": os.cpu_count(),
        "backends": dispatch.summary(args.device), "repeats": repeats,
        "weights": "random (speed and memory do not depend on them)",
    }
    payload = {"meta": meta, "configs": {k: {**v.to_dict(), "params": v.num_parameters()}
                                         for k, v in pair.items()},
               "runs": runs, "ratios": rat, "peers": peers, "figure": note}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
