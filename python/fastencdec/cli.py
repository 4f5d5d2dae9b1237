"""Command line: ``fastencdec info | selfcheck | demo | train | eval | export | generate |
bench``.

Each subcommand is one entry of :data:`COMMANDS` (its arguments and its handler).
A user error (missing file, bad config, bad value, no CUDA) prints one line on
stderr and exits with 2; ``--debug`` shows the traceback instead. Argument ranges
are checked before any work starts.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

EXIT_USAGE = 2


class CommandError(Exception):
    """A user error found by a command: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# ---------------------------------------------------------------------- argument types
def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or (value <= low if low_open else value < low) \
                or value > high:
            bounds = f"{'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must lie in {bounds}, got {text}")
        return value
    return parse


def device_name(text: str) -> str:
    if text == "cpu":  # no torch needed (generate --runtime must not import it)
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                "CUDA is not available on this machine (no GPU, or torch "
                f"{torch.__version__} was built without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _default_device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _prefer_triton_interpreter() -> None:
    # Without a GPU, Triton kernels can still run (slowly) under its interpreter;
    # the variable must be set before any kernel is defined.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------------- commands
def cmd_info(args) -> int:
    from .info import collect, format_info

    print(format_info(collect()))
    return 0


def cmd_selfcheck(args) -> int:
    from . import selfcheck

    device = _default_device(args)
    print(f"self-check on {device}: kernels vs fastencdec.reference (float64)")
    ok = selfcheck.run(device)
    print("self-check:", "all kernels agree with the reference" if ok else "MISMATCH")
    return 0 if ok else 1


def cmd_demo(args) -> int:
    if args.vision:  # the vision-language demo lives in fastencdec.vision
        from .vision.cli import run_vision_demo_command

        return run_vision_demo_command(args)
    from .training.demo import DemoSettings, run_demo

    settings = DemoSettings.for_mode(quick=args.quick, size=args.size, device=args.device,
                                     out_dir=args.out, seed=args.seed, steps=args.steps,
                                     threads=args.threads)
    rc = cmd_info(args)
    print()
    rc = rc or cmd_selfcheck(args)
    print()
    result = run_demo(settings)
    return rc or result["exit_code"]


def cmd_train(args) -> int:
    from .training.run_config import load_run_file, run_training
    from .training.run_schema import apply_overrides

    run = load_run_file(args.config)
    sets = list(args.set or [])
    if args.max_steps is not None:
        sets.append(f"training.max_steps={args.max_steps}")
    if sets:
        run = apply_overrides(run, sets)
    model_dir = run_training(run, resume=args.resume, device=args.device,
                             overwrite=args.overwrite, force_resume=args.force_resume,
                             threads=args.threads)
    print(f"model saved to {model_dir}")
    return 0


def cmd_eval(args) -> int:
    import json

    from .training.eval_run import evaluate_saved_model
    from .training.threads import choose_threads, warn_if_oversubscribed

    device = _default_device(args)
    if device == "cpu":
        threads, _ = choose_threads(args.threads, device=device, params=None)
        warn_if_oversubscribed(threads)
    result = evaluate_saved_model(args.model, args.data, fmt=args.format,
                                  tokenizer=args.tokenizer, device=device,
                                  max_examples=args.max_examples, batch_size=args.batch_size,
                                  max_source_len=args.max_source_len,
                                  max_new_tokens=args.max_new_tokens, split=args.split,
                                  predictions=args.predictions)
    print(f"{result['examples']} examples of {args.data} ({result['format']})")
    for key in ("loss", "exact_match", "token_f1", "rouge_l"):
        print(f"  {key:<12} {result[key]:.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        print(f"metrics written to {args.json}")
    return 0


def _to_inference(model, dtype: str):
    try:
        from .models.quantize import to_inference
    except ImportError:
        if dtype != "fp32":
            raise CommandError(f"--dtype {dtype} is unavailable in this version of fastencdec "
                               "(fastencdec.models.quantize is missing); use --dtype fp32"
                               ) from None
        return model
    return to_inference(model, dtype)


def cmd_export(args) -> int:
    from .data.json_tokenizer import load_tokenizer
    from .models.quantize import save_inference
    from .training.run_config import load_pretrained
    from .training.threads import choose_threads

    if os.path.exists(args.out) and os.listdir(args.out):
        raise CommandError(f"--out {args.out} exists and is not empty")
    model = load_pretrained(args.model, device="cpu")
    choose_threads(args.threads, device="cpu", params=model.num_parameters())
    model = _to_inference(model, args.dtype)
    try:  # loaded and saved again: its special tokens travel with it
        tok = load_tokenizer(args.tokenizer or args.model)
    except FileNotFoundError:
        if args.tokenizer is not None:
            raise
        tok = None
    save_inference(model, args.out)
    if tok is not None:
        tok.save(args.out)
    print(f"{args.dtype} model written to {args.out}"
          + (" with its tokenizer" if tok is not None else " (no tokenizer in --model: pass "
             "--tokenizer to generate)"))
    if args.dtype != "fp32":
        print(f"serve it without torch: fastencdec generate --runtime --model {args.out} "
              "--prompt ...")
    return 0


def _saved_format(directory: str) -> str | None:
    """The inference format of a ``save_inference`` folder, None for a float one."""
    from .runtime.safetensors_file import SafetensorsFile
    from .runtime.weights import FORMAT_KEY, WEIGHTS_NAME

    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        return None
    with SafetensorsFile(weights) as f:
        return f.metadata.get(FORMAT_KEY)


def _prompt_ids(tok, args):
    """Token ids of ``--prompt`` (QA-formatted with ``--context``)."""
    from .data.seq2seq import format_qa_prompt

    prompts = args.prompt
    if args.context is not None:
        prompts = [format_qa_prompt(p, args.context) for p in prompts]
    return tok.encode(list(prompts))


def _generate_on_runtime(args) -> int:
    """``generate --runtime``: an int8/bf16 ``save_inference`` folder on the torch-free
    runtime; nothing here imports torch."""
    import numpy as np

    from . import runtime
    from .data.json_tokenizer import load_tokenizer

    if args.image:
        raise CommandError("--runtime serves text models; drop --runtime for --image")
    if args.device not in (None, "cpu"):
        raise CommandError(f"--runtime runs on the CPU, not --device {args.device}")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"model folder not found: {args.model}")
    fmt = _saved_format(args.model)
    if fmt not in ("int8", "bf16"):
        raise CommandError(f"--runtime serves int8/bf16 folders written by `fastencdec export` "
                           f"(or save_inference); {args.model} holds "
                           f"{'float' if fmt is None else fmt} weights")
    if args.dtype not in (None, fmt):
        raise CommandError(f"{args.model} holds {fmt} weights, not --dtype {args.dtype}")
    model = runtime.load(args.model, threads=args.threads)
    tok = load_tokenizer(args.tokenizer or args.model)
    seqs = _prompt_ids(tok, args)
    limit = model.config.max_position_embeddings
    longest = max(len(s) for s in seqs)
    if longest > limit and model.config.rope_scaling_factor <= 1:
        raise CommandError(f"--prompt is {longest} tokens long but the model reads at most "
                           f"{limit} (max_position_embeddings)")
    ids = np.full((len(seqs), max(longest, 1)), tok.pad_id, dtype=np.int64)
    mask = np.zeros(ids.shape, dtype=np.bool_)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)], mask[row, :len(seq)] = seq, True
    out = model.generate(ids, mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tok.eos_id)
    for text in tok.batch_decode(out):
        print(text)
    return 0


def cmd_generate(args) -> int:
    if args.runtime:
        return _generate_on_runtime(args)
    if args.image:  # a vision-language model: fastencdec.vision
        from .vision.cli import generate_with_images

        return generate_with_images(args)
    from .data import load_tokenizer
    from .models.quantize import load_inference
    from .training.run_config import load_pretrained
    from .training.threads import choose_threads, warn_if_oversubscribed

    fmt = _saved_format(args.model)
    device = (args.device or "cpu") if fmt is not None else _default_device(args)
    if fmt is not None:  # an inference folder (fastencdec export / save_inference)
        if args.dtype not in (None, fmt):
            raise CommandError(f"{args.model} holds {fmt} weights, not --dtype {args.dtype}")
        if device != "cpu":
            raise CommandError(f"{args.model} holds {fmt} CPU inference weights; use --device cpu")
        model = load_inference(args.model)
    else:
        model = load_pretrained(args.model, device=device)
    if device == "cpu":
        threads, _ = choose_threads(args.threads, device=device, params=model.num_parameters()
                                    if fmt is None else model.config.num_parameters())
        warn_if_oversubscribed(threads)
    if fmt is None:
        model = _to_inference(model, args.dtype or "fp32")
    tok = load_tokenizer(args.tokenizer or args.model)
    batch = tok.pad(_prompt_ids(tok, args))
    limit = model.config.max_position_embeddings
    if batch["input_ids"].shape[1] > limit and model.config.rope_scaling_factor <= 1:
        raise CommandError(f"--prompt is {batch['input_ids'].shape[1]} tokens long but the model "
                           f"reads at most {limit} (max_position_embeddings)")
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
    import torch

    dirs = list(dict.fromkeys(d for d in _bench_dirs() if os.path.isdir(d)))
    if not dirs:
        raise CommandError("the benchmarks are not installed with the package: run "
                           "`fastencdec bench NAME` inside a source checkout of fastencdec "
                           "(its bench/ folder), e.g. after `git clone` of the repository")
    for d in dirs:
        for name in (f"{args.name}.py", f"bench_{args.name}.py"):
            script = os.path.join(d, name)
            if os.path.isfile(script):
                if not torch.cuda.is_available():
                    print("note: no CUDA GPU here, so Triton kernels run under Triton's CPU "
                          "interpreter: their timings mean nothing (a smoke run); the C++ CPU "
                          "kernels' timings are real", file=sys.stderr)
                return subprocess.call([sys.executable, script, *args.bench_args])
    available = sorted({f[:-3].removeprefix("bench_") for d in dirs for f in os.listdir(d)
                        if f.endswith(".py") and not f.startswith("_")})
    raise CommandError(f"no benchmark named {args.name!r} in {', '.join(dirs)}; available: "
                       f"{', '.join(available) or 'none'}")


# ---------------------------------------------------------------------- arguments
def _device_arg(p, help_text="cpu or cuda (default: cuda if present)"):
    p.add_argument("--device", type=device_name, default=None, help=help_text)


def _threads_arg(p):
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU threads for torch (default: 1 for small models on the CPU, "
                        "else torch's)")


def args_selfcheck(p):
    _device_arg(p)


def args_demo(p):
    p.add_argument("--quick", action="store_true", help="reduced run for CI (< 1 minute)")
    p.add_argument("--vision", action="store_true",
                   help="the vision-language demo (synthetic visual QA) instead")
    _device_arg(p)
    p.add_argument("--size", default="small", choices=("small", "medium", "large"),
                   help="model and data size (medium/large are for GPUs)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="training steps per model")
    p.add_argument("--out", default=None, help="folder for the plot, models and results "
                                               "(default: ./fastencdec-demo)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    _threads_arg(p)


def args_train(p):
    p.add_argument("--config", required=True, help="run config (.yaml, .yml or .json)")
    p.add_argument("--resume", default=None,
                   help="'auto' (the newest checkpoint in output_dir) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds another run (its checkpoints, "
                        "metrics and models are removed)")
    p.add_argument("--force-resume", action="store_true",
                   help="resume from a checkpoint written with a different configuration")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a run-config value (repeatable), e.g. training.lr=1e-3")
    p.add_argument("--max-steps", type=int_at_least(1), default=None,
                   help="shorthand for --set training.max_steps=N")
    _device_arg(p)
    _threads_arg(p)


def args_eval(p):
    p.add_argument("--model", required=True, help="folder written by save_pretrained / train")
    p.add_argument("--data", required=True, help="held-out records (jsonl/json/csv/parquet "
                                                 "file or a hub dataset)")
    p.add_argument("--format", default=None, choices=("qa", "seq2seq", "image_text"),
                   help="how records hold inputs and answers (default: from the fields; "
                        "image_text for a vision-language model)")
    p.add_argument("--split", default="validation", help="split of a hub dataset")
    p.add_argument("--tokenizer", default=None, help="default: the one in --model")
    p.add_argument("--max-examples", type=int_at_least(1), default=500)
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--max-source-len", type=int_at_least(1), default=None)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--predictions", default=None, help="write predictions (JSONL) here")
    p.add_argument("--json", default=None, help="write the metrics (JSON) here")
    _device_arg(p)
    _threads_arg(p)


def args_generate(p):
    p.add_argument("--model", required=True, help="folder written by save_pretrained, or by "
                   "`fastencdec export` / save_inference")
    p.add_argument("--prompt", required=True, action="append",
                   help="input text (repeat for a batch); a question with --context")
    p.add_argument("--context", default=None,
                   help="wrap each prompt as a question about this context (QA format)")
    p.add_argument("--image", action="append", default=None,
                   help="image file for a vision-language model (once for all prompts, or "
                        "once per --prompt)")
    p.add_argument("--tokenizer", default=None, help="default: the one in --model")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float_in(0.0, 1e4), default=1.0)
    p.add_argument("--top-k", type=int_at_least(1), default=None)
    p.add_argument("--top-p", type=float_in(0.0, 1.0), default=None)
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "int8"),
                   help="inference weights (bf16/int8 via fastencdec.models.quantize); "
                        "default fp32, or the format of an exported folder")
    p.add_argument("--runtime", action="store_true",
                   help="serve an exported int8/bf16 folder on the torch-free runtime "
                        "(fastencdec.runtime: numpy and the C++ kernels, no torch loaded)")
    _device_arg(p)
    _threads_arg(p)


def args_export(p):
    p.add_argument("--model", required=True, help="folder written by save_pretrained")
    p.add_argument("--dtype", required=True, choices=("int8", "bf16", "fp32"),
                   help="inference weights (to_inference)")
    p.add_argument("--out", required=True, help="new folder: the inference model (read by "
                   "load_inference, fastencdec.runtime and generate) and the tokenizer")
    p.add_argument("--tokenizer", default=None, help="default: the one in --model")
    _threads_arg(p)


def args_bench(p):
    p.add_argument("name", help="benchmark name (bench/NAME.py or bench/bench_NAME.py)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script")


@dataclass(frozen=True)
class Command:
    run: Callable
    add_arguments: Callable | None
    help: str


COMMANDS: dict[str, Command] = {
    "info": Command(cmd_info, None, "versions, compiled CPU ISA, Triton/CUDA, backend per op"),
    "selfcheck": Command(cmd_selfcheck, args_selfcheck, "compare every kernel with the reference"),
    "demo": Command(cmd_demo, args_demo, "the main job: train a teacher and encoder-decoder / "
                                         "decoder-only students on a synthetic QA task, compare"),
    "train": Command(cmd_train, args_train, "pretrain / finetune / distill from a run config"),
    "eval": Command(cmd_eval, args_eval, "exact match, token F1, ROUGE-L and held-out loss of a "
                                         "saved model"),
    "export": Command(cmd_export, args_export, "write an int8/bf16/fp32 CPU inference model "
                                               "(for load_inference and fastencdec.runtime)"),
    "generate": Command(cmd_generate, args_generate, "generate text with a saved model"),
    "bench": Command(cmd_bench, args_bench, "run a benchmark script from bench/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastencdec", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # also accepted after the subcommand (SUPPRESS: it must not reset a --debug given before)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, parents=[common])
        if command.add_arguments is not None:
            command.add_arguments(p)
    return parser


def _user_errors() -> tuple:
    errors = [CommandError, ValueError, KeyError, FileNotFoundError, NotADirectoryError,
              IsADirectoryError, PermissionError, ImportError]
    # errors of modules the command imported (only they can raise them); importing them
    # here would load torch into a torch-free command (generate --runtime)
    for module, name in (("fastencdec.data.sources", "DatasetUnavailableError"),
                         ("fastencdec.training.checkpoint", "CheckpointWriteError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = str(text).strip() or type(exc).__name__
    return " ".join(text.split())


def _training_interrupted(exc: BaseException) -> bool:
    # only a command that imported the training loop can raise it (generate --runtime
    # must not import torch, which fastencdec.training does)
    interrupt = sys.modules.get("fastencdec.training.interrupt")
    return interrupt is not None and isinstance(exc, interrupt.TrainingInterrupted)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "runtime", False):
        _prefer_triton_interpreter()

    try:
        try:
            return COMMANDS[args.command].run(args)
        except BaseException as exc:
            if not _training_interrupted(exc):
                raise
            print(str(exc), file=sys.stderr)
            return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"fastencdec {args.command}: aborted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"fastencdec {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
