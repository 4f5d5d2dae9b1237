"""Command line: ``fastencdec info | selfcheck | demo | train | generate | bench``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _prefer_triton_interpreter() -> None:
    # Without a GPU, Triton kernels can still run (slowly) under its interpreter;
    # the variable must be set before any kernel is defined.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cmd_info(args) -> int:
    from .info import collect, format_info

    print(format_info(collect()))
    return 0


def cmd_selfcheck(args) -> int:
    import torch

    from . import selfcheck

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"self-check on {device}: kernels vs fastencdec.reference (float64)")
    ok = selfcheck.run(device)
    print("self-check:", "all kernels agree with the reference" if ok else "MISMATCH")
    return 0 if ok else 1


def cmd_demo(args) -> int:
    from .training.demo import DemoSettings, run_demo

    rc = cmd_info(args)
    print()
    rc = rc or cmd_selfcheck(args)
    print()
    settings = DemoSettings.for_mode(quick=args.quick, size=args.size, device=args.device,
                                     out_dir=args.out, seed=args.seed, steps=args.steps,
                                     threads=args.threads)
    result = run_demo(settings)
    return rc or (0 if result["ok"] else 1)


def cmd_train(args) -> int:
    from .training.run_config import load_run_file, run_training

    run = load_run_file(args.config)
    model_dir = run_training(run, resume=args.resume, device=args.device)
    print(f"model saved to {model_dir}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .data import Tokenizer, format_qa_prompt
    from .training.run_config import load_pretrained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.model, device=device)
    tok_path = args.tokenizer or os.path.join(args.model, "tokenizer.model")
    tok = Tokenizer.load(tok_path)
    prompts = args.prompt
    if args.context is not None:
        prompts = [format_qa_prompt(p, args.context) for p in prompts]
    batch = tok(prompts)
    out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                         max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tok.eos_id)
    for text in tok.batch_decode(out.cpu()):
        print(text)
    return 0


def _bench_dirs() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    # a source checkout (editable install): <repo>/python/fastencdec/cli.py
    return [os.path.join(os.getcwd(), "bench"),
            os.path.normpath(os.path.join(here, "..", "..", "bench"))]


def cmd_bench(args) -> int:
    dirs = [d for d in _bench_dirs() if os.path.isdir(d)]
    for d in dirs:
        for name in (f"{args.name}.py", f"bench_{args.name}.py"):
            script = os.path.join(d, name)
            if os.path.isfile(script):
                return subprocess.call([sys.executable, script, *args.bench_args])
    available = sorted({f[:-3].removeprefix("bench_") for d in dirs for f in os.listdir(d)
                        if f.endswith(".py") and not f.startswith("_")})
    where = ", ".join(dirs) or "no bench/ folder found (run from a source checkout)"
    print(f"no benchmark named {args.name!r} in {where}; available: {available or 'none'}",
          file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastencdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled CPU ISA, Triton/CUDA, backend per op")
    check = sub.add_parser("selfcheck", help="compare every kernel with the reference")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")

    demo = sub.add_parser("demo", help="the main job: train a teacher and encoder-decoder / "
                                       "decoder-only students on a synthetic QA task, compare")
    demo.add_argument("--quick", action="store_true", help="reduced run for CI (< 1 minute)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--size", default="small", choices=("small", "medium", "large"),
                      help="model and data size (medium/large are for GPUs)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model")
    demo.add_argument("--out", default=None, help="folder for the plot and metrics "
                                                 "(default: ./fastencdec-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None,
                      help="CPU threads for torch (default: torch's; 1 is steadier on a busy "
                           "machine)")

    train = sub.add_parser("train", help="pretrain / finetune / distill from a run config")
    train.add_argument("--config", required=True, help="run config (.yaml, .yml or .json)")
    train.add_argument("--resume", default=None, help="'auto' or a checkpoint folder")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")

    gen = sub.add_parser("generate", help="generate text with a saved model")
    gen.add_argument("--model", required=True, help="folder written by save_pretrained")
    gen.add_argument("--prompt", required=True, action="append",
                     help="input text (repeat for a batch); a question with --context")
    gen.add_argument("--context", default=None,
                     help="wrap each prompt as a question about this context (QA format)")
    gen.add_argument("--tokenizer", default=None, help="default: MODEL/tokenizer.model")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--device", default=None)

    bench = sub.add_parser("bench", help="run a benchmark script from bench/")
    bench.add_argument("name", help="benchmark name (bench/NAME.py or bench/bench_NAME.py)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _prefer_triton_interpreter()
    handlers = {"info": cmd_info, "selfcheck": cmd_selfcheck, "demo": cmd_demo,
                "train": cmd_train, "generate": cmd_generate, "bench": cmd_bench}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
