"""The demo's conclusions: one verdict per claim, a results table, and the figure.

Accuracy claims are decided with a paired test on the same test questions: model A
beats model B when ``(wins - losses) / n`` exceeds twice its standard error
``sqrt(wins + losses) / n`` (a sign test at about 95%); a model is above chance when
its exact match exceeds chance by twice the binomial standard error. A claim that
the numbers do not support is reported as "not shown", never as shown.
"""

from __future__ import annotations

import math
import statistics

__all__ = ["beats", "above_chance", "verdicts", "plot_demo"]


def beats(hits_a: list[bool], hits_b: list[bool]) -> tuple[bool, float, float]:
    """``(significant, difference, standard error)`` of A's exact match over B's."""
    if len(hits_a) != len(hits_b) or not hits_a:
        raise ValueError("paired comparison needs two equally long, non-empty hit lists")
    n = len(hits_a)
    wins = sum(a and not b for a, b in zip(hits_a, hits_b, strict=True))
    losses = sum(b and not a for a, b in zip(hits_a, hits_b, strict=True))
    diff, se = (wins - losses) / n, math.sqrt(wins + losses) / n
    return diff > 2 * se and diff > 0, diff, se


def above_chance(em: float, chance: float, n: int) -> bool:
    se = math.sqrt(max(chance * (1 - chance), 1e-12) / max(n, 1))
    return em > chance + 2 * se


def verdicts(runs: dict, chance: float, speed: dict) -> list[tuple[str, bool, str]]:
    """``(claim, shown, evidence)`` for each claim of the demo."""
    n = len(runs["encoder-decoder, CE"]["hits"])
    teacher, encdec = runs["teacher: decoder-only"], runs["encoder-decoder, CE"]
    distilled, deconly = runs["encoder-decoder, distilled"], runs["decoder-only, CE"]
    out = []
    ok = above_chance(teacher["em"], chance, n)
    out.append(("the teacher knows the task (well above chance)", ok,
                f"exact match {teacher['em']:.3f} vs chance {chance:.3f}"))
    shown, diff, se = beats(encdec["hits"], deconly["hits"])
    out.append(("encoder-decoder beats the decoder-only model of the same size", shown,
                f"exact match {encdec['em']:.3f} vs {deconly['em']:.3f} "
                f"(difference {diff:+.3f}, 2 x s.e. {2 * se:.3f})"))
    shown, diff, se = beats(distilled["hits"], encdec["hits"])
    out.append(("distillation adds to cross-entropy alone", shown,
                f"exact match {distilled['em']:.3f} vs {encdec['em']:.3f} "
                f"(difference {diff:+.3f}, 2 x s.e. {2 * se:.3f})"))
    ed, do = speed["encoder-decoder"], speed["decoder-only"]
    ratio = ed["tokens_per_s"] / do["tokens_per_s"]
    latency = do["first_token_ms"] / ed["first_token_ms"]
    out.append(("encoder-decoder generates faster (timing: varies run to run)", ratio > 1.0,
                f"{ratio:.2f}x the tokens/s after the first token, the first token "
                f"{latency:.2f}x sooner"))
    return out


def plot_demo(runs: dict, chance: float, speed: dict, path: str, title: str) -> str | None:
    """Four panels: training objective, held-out CE, exact match (with chance), and
    generation speed (a timing). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), dpi=100)
    (loss_ax, ce_ax), (em_ax, speed_ax) = axes
    colors = [c["color"] for c in plt.rcParams["axes.prop_cycle"]]
    names = list(runs)
    for name, color in zip(names, colors, strict=False):
        losses = runs[name]["losses"]
        steps = range(1, len(losses) + 1)
        loss_ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        window = max(len(losses) // 25, 1)  # a moving median: robust to single spikes
        smooth = [statistics.median(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        loss_ax.plot(steps, smooth, color=color, linewidth=2, label=name)
        points = runs[name]["held_out_ce"]
        ce_ax.plot([p[0] for p in points], [p[1] for p in points], color=color, linewidth=2,
                   marker="o", markersize=3, label=name)
    loss_ax.set_title("training objective per target token")
    ce_ax.set_title("held-out cross-entropy per target token")
    for ax in (loss_ax, ce_ax):
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ems = [runs[n]["em"] for n in names]
    em_ax.bar(range(len(names)), ems, color=colors[:len(names)], label="exact match")
    em_ax.axhline(chance, color="black", linestyle="--", linewidth=1, label="chance")
    em_ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    em_ax.set_ylim(0, 1)
    em_ax.set_title("exact match on the test questions")
    em_ax.legend(fontsize=8)
    for i, v in enumerate(ems):
        em_ax.text(i, v + 0.02, f"{v:.3f}", ha="center", fontsize=8)
    archs = list(speed)
    rates = [speed[a]["tokens_per_s"] for a in archs]
    # each architecture in the colour of its cross-entropy student above
    arch_colors = [colors[names.index(f"{a}, CE") % len(colors)] if f"{a}, CE" in names
                   else colors[0] for a in archs]
    speed_ax.bar(range(len(archs)), rates, color=arch_colors,
                 label="tokens/s after the first token")
    speed_ax.set_xticks(range(len(archs)),
                        [f"{a}\nfirst token {speed[a]['first_token_ms']:.1f} ms" for a in archs],
                        fontsize=8)
    speed_ax.set_title("generation speed, batch 1 (a timing: varies run to run)")
    speed_ax.set_ylabel("tokens/s")
    speed_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
