"""Class activation maps (Zhou et al. 2016) as pure numpy functions."""

from __future__ import annotations

import numpy as np


def class_activation_maps(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """CAM for every class: ``cam[..., k, y, x] = sum_c features[..., y, x, c] * W[c, k]``.

    features: (..., H, W, C) feature maps; weights: (C, K) Dense weights after the GAP.
    Returns (..., K, H, W) float32: raw, signed, no bias, not normalized. Its spatial mean
    plus the Dense bias is the logit.
    """
    cams = np.einsum("...yxc,ck->...kyx", features, weights, optimize=True)
    return cams.astype(np.float32, copy=False)


def grid_centres(input_size: int, grid_size: int) -> np.ndarray:
    """Centres of ``grid_size`` equal cells spanning ``input_size`` pixels, in pixel units.

    Pixel ``i`` covers [i, i + 1), so a grid cell ``j`` of width ``input_size / grid_size``
    is centred at ``(j + 0.5) * input_size / grid_size``.
    """
    return (np.arange(grid_size) + 0.5) * (input_size / grid_size)
