"""Class activation maps (Zhou et al. 2016) as pure numpy functions."""

from __future__ import annotations

import numpy as np


def class_activation_maps(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """CAM for every class: ``cam[..., k, y, x] = sum_c features[..., y, x, c] * W[c, k]``.

    features: (..., H, W, C) feature maps; weights: (C, K) Dense weights after the GAP.
    Returns (..., K, H, W) float32, contiguous: raw, signed, no bias, not normalized. Its
    spatial mean plus the Dense bias is the logit. One matmul over all maps' pixels
    (MHW x C by C x K), then one transposing copy to the class-major layout: twice as fast
    as a matmul per map that writes that layout directly (measured with one BLAS thread:
    0.27 against 0.55 ms per image of 30 steps, 16x16x64 features).
    """
    lead, (height, width, channels) = features.shape[:-3], features.shape[-3:]
    classes = weights.shape[1]
    pixels = np.reshape(features, (-1, channels)) @ weights  # (M * H * W, K)
    cams = np.ascontiguousarray(pixels.reshape((-1, height * width, classes)).transpose(0, 2, 1))
    return cams.reshape(lead + (classes, height, width)).astype(np.float32, copy=False)


def step_class_activation_maps(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """CAMs of per-step features (N, T, H, W, C) in the store's order, class before step:
    (N, K, T, H, W) float32, contiguous. The steps of an image are one map stacked along y,
    so this is one matmul per image."""
    n, steps, height, width, channels = features.shape
    stacked = class_activation_maps(features.reshape(n, steps * height, width, channels), weights)
    return stacked.reshape(n, weights.shape[1], steps, height, width)


def grid_centres(input_size: int, grid_size: int) -> np.ndarray:
    """Centres of ``grid_size`` equal cells spanning ``input_size`` pixels, in pixel units.

    Pixel ``i`` covers [i, i + 1), so a grid cell ``j`` of width ``input_size / grid_size``
    is centred at ``(j + 0.5) * input_size / grid_size``.
    """
    return (np.arange(grid_size) + 0.5) * (input_size / grid_size)
