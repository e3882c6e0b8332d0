"""``transforms.localization.localize`` on maps at their own size (no resampling: the
resize to the same size is the identity), for tests of its boxes and peaks; Pearson
correlation in plain numpy."""

from __future__ import annotations

import numpy as np

from transforms.localization import localize


def boxes_of(maps: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Box of the largest blob of ``map >= threshold * max`` of (..., H, W) maps: (..., 4)."""
    maps = np.asarray(maps)
    no_truth = np.full((1, 1, 4), np.nan, np.float32)
    return localize(maps[None], maps.shape[-2:], threshold, no_truth)["box"][0]


def peaks_of(maps: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Peak, pointing game and energy of (N, ..., H, W) maps against truth (N, B, 4)."""
    found = localize(np.asarray(maps), maps.shape[-2:], 0.2, truth)
    del found["box"]
    return found


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of broadcastable (..., H, W) maps over H, W; NaN if either is constant."""
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    b = b - b.mean(axis=(-2, -1), keepdims=True)
    numerator = (a * b).sum(axis=(-2, -1))
    denominator = np.sqrt((a * a).sum(axis=(-2, -1)) * (b * b).sum(axis=(-2, -1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)
