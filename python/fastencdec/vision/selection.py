"""Variance-based crop selection (the paper's image-token compression).

Each grid crop (not the base crop) is scored by the standard deviation of its
grayscale pixels; flat crops (empty background, padding) score near 0 and are the
first dropped. Keeping the top ``k`` keeps ``k`` crops' tokens plus the base's.
"""

from __future__ import annotations

import numpy as np

from ..argcheck import int_at_least

__all__ = ["LUMA", "crop_std", "select_top_k"]

# ITU-R BT.601 luma, pillow's weights for convert("L")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def crop_std(crops: np.ndarray) -> np.ndarray:
    """uint8 (or float, 0-255) ``[n, S, S, 3]`` RGB crops -> float64 ``[n]``: the
    population standard deviation of each crop's grayscale pixels."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"crops must be [n, S, S, 3] RGB, got shape {list(crops.shape)}")
    gray = (crops.astype(np.float64) @ LUMA).reshape(len(crops), -1)
    # std is shift-invariant; shifting by each crop's first pixel makes a flat crop
    # exactly 0 (its float mean would otherwise round to a 1e-14-ish spread)
    return (gray - gray[:, :1]).std(axis=1)


def select_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest ``scores``, returned in increasing order (the crops
    keep their spatial order). Ties go to the earlier crop; ``k >= n`` keeps all."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {list(scores.shape)}")
    k = int_at_least("k", k, 0)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:k])
