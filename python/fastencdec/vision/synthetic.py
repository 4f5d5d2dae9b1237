"""Synthetic visual QA: coloured shapes on large, mostly flat canvases.

Each image has one triangle and zero to two circles (and sometimes a square), each
inside its own cell of the any-res grid, so most crops are empty background and
variance-based crop selection has something to drop. Questions:
"what colour is the triangle?" (a colour word) and "how many circles?" (a number
word). Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..argcheck import int_at_least, positive_int

__all__ = ["COLOURS", "NUMBERS", "VisualQA", "QUESTIONS"]

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 200, 20)}
NUMBERS = ("zero", "one", "two")
QUESTIONS = ("what colour is the triangle?", "how many circles?")


def _draw(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)


class VisualQA:
    """``generate(n, split)`` -> list of ``{"image": PIL.Image, "source", "target"}``.

    ``cell``: the crop size (shapes stay inside one cell each); ``canvases``: image
    sizes in cells (columns, rows)."""

    def __init__(self, *, cell: int = 32, canvases=((3, 3), (3, 2), (2, 3)), seed: int = 0,
                 background=(235, 235, 228)):
        self.cell = positive_int("cell", cell)
        self.canvases, self.seed = tuple(canvases), int_at_least("seed", seed, 0)
        for canvas in self.canvases:  # a triangle and up to two circles, one per cell
            if not isinstance(canvas, (tuple, list)) or len(canvas) != 2:
                raise ValueError(f"canvases must hold (columns, rows) pairs, got {canvas!r}")
            cols, rows = (positive_int("canvas width (cells)", canvas[0]),
                          positive_int("canvas height (cells)", canvas[1]))
            if cols * rows < 3:
                raise ValueError(f"canvas {tuple(canvas)} has {cols * rows} cell(s); each canvas "
                                 "needs at least 3 (a triangle and up to two circles)")
        self.background = background

    def _one(self, rng: np.random.Generator) -> dict:
        cols, rows = self.canvases[rng.integers(len(self.canvases))]
        img = Image.new("RGB", (cols * self.cell, rows * self.cell), self.background)
        draw = ImageDraw.Draw(img)
        n_circles = int(rng.integers(0, 3))
        kinds = ["triangle"] + ["circle"] * n_circles
        if rng.random() < 0.5 and len(kinds) < cols * rows:
            kinds.append("square")
        cells = rng.choice(cols * rows, size=len(kinds), replace=False)
        names = list(COLOURS)
        triangle_colour = names[rng.integers(len(names))]
        for kind, cell in zip(kinds, cells, strict=True):
            r = float(rng.uniform(0.28, 0.4) * self.cell)
            row, col = divmod(int(cell), cols)
            margin = r + 1
            cx = col * self.cell + rng.uniform(margin, self.cell - margin)
            cy = row * self.cell + rng.uniform(margin, self.cell - margin)
            colour = triangle_colour if kind == "triangle" else names[rng.integers(len(names))]
            _draw(draw, kind, cx, cy, r, COLOURS[colour])
        if rng.random() < 0.5:
            return {"image": img, "source": QUESTIONS[0], "target": triangle_colour}
        return {"image": img, "source": QUESTIONS[1], "target": NUMBERS[n_circles]}

    def generate(self, n: int, split: str = "train") -> list[dict]:
        n = int_at_least("n", n, 0)
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        offset = {"train": 0, "valid": 1, "test": 2}[split]
        rng = np.random.default_rng([self.seed, offset])
        return [self._one(rng) for _ in range(n)]

    @staticmethod
    def corpus() -> list[str]:
        return list(QUESTIONS) + list(COLOURS) + list(NUMBERS)

    @staticmethod
    def majority_exact_match(train: list[dict], test: list[dict]) -> float:
        """EM of answering each question with its most frequent training answer."""
        best = {}
        for q in QUESTIONS:
            answers = [ex["target"] for ex in train if ex["source"] == q]
            best[q] = max(set(answers), key=answers.count) if answers else ""
        return sum(best[ex["source"]] == ex["target"] for ex in test) / max(len(test), 1)
