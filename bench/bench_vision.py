"""Vision-language generation: first-token latency and tokens/s vs the number of image
tokens (1, 3 and 5 crops), encoder-decoder vs decoder-only VLM of the same size.

Both models share one vision tower and projector (random weights: speed does not
depend on them) and have language models of equal parameter count. Each point is a
batch-1 greedy generation of ``--new-tokens`` tokens (EOS ignored); the first-token
latency covers the tower, the projector and the encoder (or the prompt prefill) plus
the first step. Timings alternate between the two models rep by rep. Prints a table
with the encoder-decoder / decoder-only ratios and writes JSON under bench/results/.

    python bench/bench_vision.py                 # CPU, tiny tower
    python bench/bench_vision.py --device cuda --size base
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Column, Run, format_table  # noqa: E402
from fastencdec import DecoderOnlyConfig, EncDecConfig  # noqa: E402
from fastencdec.vision.anyres import AnyResConfig  # noqa: E402
from fastencdec.vision.config import VLMConfig  # noqa: E402
from fastencdec.vision.models import DecoderOnlyVLM, EncoderDecoderVLM  # noqa: E402
from fastencdec.vision.tower import VisionConfig  # noqa: E402

SIZES = {
    # tiny: 16 tokens per crop, a 0.3M-parameter language model (the demo's scale)
    "tiny": dict(vision="tiny", d_model=64, enc=2, dec=1, heads=4, kv=2, d_ff=128),
    # base: CLIP ViT-L/14-336 (576 tokens per crop) and a ~100M language model
    "base": dict(vision="clip-vit-l-336", d_model=768, enc=8, dec=4, heads=12, kv=4, d_ff=3072),
}


def build(size: str, device, dtype):
    spec = SIZES[size]
    vision = VisionConfig.preset(spec["vision"])
    text = EncDecConfig.preset("tiny").replace(
        vocab_size=512, d_model=spec["d_model"], n_encoder_layers=spec["enc"],
        n_decoder_layers=spec["dec"], n_heads=spec["heads"], n_kv_heads=spec["kv"],
        head_dim=64 if spec["d_model"] >= 512 else 32, d_ff=spec["d_ff"],
        max_position_embeddings=4096)
    anyres = AnyResConfig(crop_size=vision.image_size)
    torch.manual_seed(0)
    enc = EncoderDecoderVLM(VLMConfig(text=text, vision=vision, anyres=anyres))
    dec = DecoderOnlyVLM(VLMConfig(text=DecoderOnlyConfig.twin_of(text), vision=vision,
                                   anyres=anyres))
    dec.vision.load_state_dict(enc.vision.state_dict())
    dec.projector.load_state_dict(enc.projector.state_dict())
    return enc.to(device, dtype).eval(), dec.to(device, dtype).eval()


@torch.no_grad()
def one_run(model, ids, pixels, new_tokens, sync) -> tuple[float, float]:
    stamps: list[float] = []
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, image_pixels=pixels, max_new_tokens=new_tokens, eos_token_id=(),
                         streamer=lambda _t: stamps.append(time.perf_counter()))
    sync()
    t1 = time.perf_counter()
    return stamps[0] - t0, (out.shape[1] - 1) / max(t1 - stamps[0], 1e-9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--crops", default="1,3,5", help="crops per image (base included)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny: 1 is best)")
    parser.add_argument("--out", default=None, help="result file (default: bench/results/...)")
    args = parser.parse_args(argv)
    crops = [int(c) for c in args.crops.split(",")]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run = Run("vision", device=str(device), threads=args.threads if device.type == "cpu"
              else None, out=args.out)
    enc, dec = build(args.size, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.randint(3, 512, (1, args.prompt_tokens), device=device)
    per_crop = enc.config.vision.tokens_per_crop
    side = enc.config.vision.image_size
    rows = []
    for n in crops:
        pixels = torch.randn(1, n, 3, side, side, device=device, dtype=dtype)
        samples = {"encoder-decoder": [], "decoder-only": []}
        for model in (enc, dec):
            one_run(model, ids, pixels, 2, sync)  # warm-up
        for rep in range(args.repeats):
            pair = [("encoder-decoder", enc), ("decoder-only", dec)]
            for name, model in pair if rep % 2 == 0 else pair[::-1]:
                samples[name].append(one_run(model, ids, pixels, args.new_tokens, sync))
        row = {"crops": n, "image_tokens": n * per_crop}
        for name, key in (("encoder-decoder", "ed"), ("decoder-only", "do")):
            row[f"{key}_first_ms"] = statistics.median(s[0] for s in samples[name]) * 1e3
            row[f"{key}_tok_s"] = statistics.median(s[1] for s in samples[name])
        row["first_ratio"] = row["do_first_ms"] / row["ed_first_ms"]
        row["tok_s_ratio"] = row["ed_tok_s"] / row["do_tok_s"]
        rows.append(row)
        print(f"  {n} crops done", flush=True)
    columns = [Column("crops", "crops"), Column("image_tokens", "image tokens"),
               Column("ed_first_ms", "enc-dec first (ms)", ".1f"),
               Column("do_first_ms", "dec-only first (ms)", ".1f"),
               Column("first_ratio", "dec-only/enc-dec first", ".2f"),
               Column("ed_tok_s", "enc-dec tok/s", ".1f"),
               Column("do_tok_s", "dec-only tok/s", ".1f"),
               Column("tok_s_ratio", "enc-dec/dec-only tok/s", ".2f")]
    print(f"vision-language generation, {args.size} models "
          f"({enc.num_parameters() / 1e6:.1f}M vs {dec.num_parameters() / 1e6:.1f}M parameters), "
          f"batch 1, {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, "
          f"{device}, {dtype}")
    print(format_table(rows, columns))
    path = run.finish({"size": args.size, "dtype": str(dtype), "rows": rows,
                       "params": {"encoder-decoder": enc.num_parameters(),
                                  "decoder-only": dec.num_parameters()},
                       "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
