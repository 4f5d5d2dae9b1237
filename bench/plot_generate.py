#!/usr/bin/env python
"""Figure of a ``bench_generate.py`` result: tokens/s and first-token latency per engine
and batch size, encoder-decoder next to decoder-only; the first-token curve when measured.

    python bench/plot_generate.py bench/results/generate_<device>_<stamp>.json [--out FIG.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ARCH_STYLE = {"encoder_decoder": ("encoder-decoder", "tab:blue"),
              "decoder_only": ("decoder-only", "tab:orange")}


def plot(record: dict, path: Path) -> str:
    """Draw ``record`` (the benchmark's JSON) to ``path``; returns a line saying where."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no figure"
    rows = record.get("rows") or []
    if not rows:
        return "no rows measured: no figure"
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    curves = [r for r in rows if r.get("first_token_curve")]
    n_panels = 2 * len(batches) + (1 if curves else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.8), squeeze=False)
    axes = axes[0]
    width = 0.4
    for col, batch in enumerate(batches):
        for ax, key, unit in ((axes[2 * col], "tokens_per_s", "tokens/s"),
                              (axes[2 * col + 1], "first_token_ms", "first token (ms)")):
            for j, (arch, (name, color)) in enumerate(ARCH_STYLE.items()):
                values = []
                for label in labels:
                    row = next((r for r in rows if r["label"] == label and r["arch"] == arch
                                and r["batch"] == batch), None)
                    values.append(row[key] if row else 0.0)
                xs = [i + (j - 0.5) * width for i in range(len(labels))]
                ax.bar(xs, values, width, label=name, color=color)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
            ax.set_title(f"batch {batch}: {unit}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    if curves:
        ax = axes[-1]
        for r in curves:
            xs, ys = zip(*r["first_token_curve"], strict=True)
            ax.plot(xs, [y * 1e3 for y in ys], marker="o",
                    label=f"{r['label']} ({ARCH_STYLE[r['arch']][0]})")
        ax.set_xlabel("input length (tokens)")
        ax.set_title("batch 1: first token (ms)", fontsize=9)
        ax.legend(fontsize=6)
    setting = record.get("setting", {})
    title = (f"{setting.get('preset')}: {setting.get('input_len')} tokens in, "
             f"{setting.get('new_tokens')} out, {setting.get('threads')} threads, "
             f"{record.get('meta', {}).get('device_name', '')}")
    if record.get("validity", {}).get("numbers_mean_nothing"):
        title += "  [NUMBERS MEAN NOTHING: " + "; ".join(record["validity"]["reasons"]) + "]"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"figure: {path}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="JSON written by bench_generate.py")
    p.add_argument("--out", type=Path, default=None, help="figure path (default: next to it)")
    args = p.parse_args(argv)
    try:
        record = json.loads(args.result.read_text())
    except (OSError, json.JSONDecodeError) as err:
        p.error(f"{args.result}: not a readable JSON result ({err})")
    if not isinstance(record, dict) or record.get("benchmark") != "generate":
        p.error(f"{args.result}: not a bench_generate.py result (benchmark != 'generate')")
    print(plot(record, args.out or args.result.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
