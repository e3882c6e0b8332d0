"""Localization statistics of CAMs as pure, vectorized numpy/scipy functions.

Conventions (shared with tfds boxes): pixel ``i`` of an ``H``-pixel image covers
[i, i + 1); boxes are (ymin, xmin, ymax, xmax) normalized by the image size, on pixel
edges, so a box covering rows r0..r1 has ymin = r0 / H and ymax = (r1 + 1) / H. NaN
boxes are "no box".

Upsampling is bilinear with half-pixel centres, computed as ``tf.image.resize`` computes
it (same float32 operations, so the same values): an output pixel at centre ``i + 0.5``
reads the CAM at ``(i + 0.5) * h / H - 0.5`` in cell units, clamped to the outer cells.
"""

from __future__ import annotations

import numpy as np

from transforms.map_kernels import localize_upsampled, sweep_component_boxes, upsample_maps


def resize_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, lerp) input cells and weight of each output pixel along one axis,
    as TensorFlow's half-pixel ``ResizeBilinear`` computes them (float32)."""
    scale = np.float32(n_in) / np.float32(n_out)
    position = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(position)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(position), n_in - 1).astype(np.int64)
    return lower, upper, (position - floor).astype(np.float32)


def upsample(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of (..., h, w) maps to (..., H, W), float32."""
    lead, (h, w) = cams.shape[:-2], cams.shape[-2:]
    flat = np.ascontiguousarray(cams, np.float32).reshape((-1, h, w))
    up = upsample_maps(flat, resize_weights(h, size[0]), resize_weights(w, size[1]))
    return up.reshape(lead + tuple(size))


def localize(cams: np.ndarray, size: tuple[int, int], threshold: float, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Box, peak, pointing game and energy of each (N, ..., h, w) map upsampled to ``size``,
    one map at a time (the upsampled maps, 16x the CAMs for 64x64 from 16x16, are never held).

    truth: (N, B, 4) normalized, NaN-padded. Returns
    box: (..., 4) the CAM paper's box: keep pixels >= threshold * max, box the largest
    8-connected blob; NaN for a map whose maximum is not positive (all zero or all
    negative: no evidence for the class); ties between equally large blobs go to the one
    whose first pixel comes first in row-major order;
    peak: (..., 2) integer (row, col) of the maximum (the first in row-major order);
    pointing: 1.0 where the peak pixel's centre lies in a ground-truth box, else 0.0;
    energy: share of the map's positive mass inside the boxes (Score-CAM's energy-based
    pointing game), 0 for a map with no positive mass. Pointing and energy are NaN for
    images without boxes.
    """
    n, lead, (h, w) = cams.shape[0], cams.shape[1:-2], cams.shape[-2:]
    flat = np.ascontiguousarray(cams, np.float32).reshape((n, -1, h, w))
    inside = in_boxes_mask(truth, size)
    boxes, index, total, within = localize_upsampled(
        flat, resize_weights(h, size[0]), resize_weights(w, size[1]), np.float32(threshold), inside)
    hit = np.take_along_axis(inside.reshape(n, -1), index, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, within / total, 0.0)
    has_gt = ~np.isnan(truth[:, :, 0]).all(axis=1)[:, None]
    shape = (n,) + lead
    return {
        "box": boxes.reshape(shape + (4,)),
        "peak": np.stack([index // size[1], index % size[1]], axis=-1).reshape(shape + (2,)),
        "pointing": np.where(has_gt, hit, np.nan).reshape(shape),
        "energy": np.where(has_gt, share, np.nan).reshape(shape),
    }


def sweep_boxes(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Box of the largest 8-connected blob of ``values >= t`` for each threshold t.

    values: (..., H, W); thresholds: (S,) ascending. Returns (..., S, 4) normalized boxes,
    NaN where no pixel reaches t. Ties as in ``localize``.
    """
    thresholds = np.asarray(thresholds, np.float64)
    if np.any(np.diff(thresholds) < 0):
        raise ValueError("sweep thresholds must be ascending")
    lead, (height, width) = values.shape[:-2], values.shape[-2:]
    maps = np.ascontiguousarray(values, np.float32).reshape((-1, height, width))
    return sweep_component_boxes(maps, thresholds).reshape(lead + (len(thresholds), 4))


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Area of (..., 4) boxes; NaN for NaN boxes."""
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of broadcastable (..., 4) boxes; NaN if either is NaN."""
    top = np.maximum(a[..., 0], b[..., 0])
    left = np.maximum(a[..., 1], b[..., 1])
    bottom = np.minimum(a[..., 2], b[..., 2])
    right = np.minimum(a[..., 3], b[..., 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    union = box_area(a) + box_area(b) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def best_iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of each predicted box with its best-matching ground-truth box.

    predicted: (N, ..., 4); truth: (N, B, 4), NaN-padded. NaN where the image has no
    ground-truth box; 0 where it has one but the prediction is NaN (no box).
    """
    extra = predicted.ndim - 2
    gt = truth.reshape(truth.shape[:1] + (1,) * extra + truth.shape[1:])  # (N, 1.., B, 4)
    scores = iou(predicted[..., None, :], gt)
    has_gt = ~np.isnan(gt[..., 0])
    scores = np.where(has_gt, np.nan_to_num(scores, nan=0.0), -np.inf).max(axis=-1)
    return np.where(np.isinf(scores), np.nan, scores)


def in_boxes_mask(truth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) True where a pixel's centre lies inside any of the image's boxes.

    truth: (N, B, 4) normalized, NaN-padded.
    """
    height, width = size
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    t = truth[..., None, None, :]
    with np.errstate(invalid="ignore"):
        inside = (
            (ys[:, None] >= t[..., 0]) & (ys[:, None] < t[..., 2])
            & (xs[None, :] >= t[..., 1]) & (xs[None, :] < t[..., 3])
        )
    return inside.any(axis=1)

