"""Command line: ``fastencdec info | selfcheck | demo``."""

from __future__ import annotations

import argparse
import os
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
    rc = cmd_info(args)
    print()
    return rc or cmd_selfcheck(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastencdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled CPU ISA, Triton/CUDA, backend per op")
    check = sub.add_parser("selfcheck", help="compare every kernel with the reference")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo = sub.add_parser("demo", help="the main job: info + self-check")
    demo.add_argument("--device", default=None)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _prefer_triton_interpreter()
    handlers = {"info": cmd_info, "selfcheck": cmd_selfcheck, "demo": cmd_demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
