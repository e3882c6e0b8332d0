"""Per-image localization and temporal statistics of CAMs (pure functions; the per-map
work is in ``transforms.map_kernels``).

Every value is a function of one image's stored ``cam``, ``cam_reference``, ``logits``,
``logits_reference``, ``label`` and ``boxes``, so results do not depend on batch size,
worker count or chunking. Box-based values are NaN for images without boxes; class-based
values are NaN for images without a label. 1.0/0.0 flags are floats so that they can be NaN.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from transforms.localization import best_iou, localize, sweep_boxes, upsample
from transforms.map_kernels import step_correlations

IOU_LOCALIZED = 0.5
TOP_K = 5


def sweep_thresholds() -> np.ndarray:
    """The MaxBoxAcc threshold sweep (wsolevaluation): 0.00, 0.01, ..., 0.99."""
    return np.round(np.arange(100) * 0.01, 2)


@dataclass(frozen=True)
class StatisticsSettings:
    """threshold: CAM-paper box threshold, a fraction of each map's maximum; size: (H, W)
    the maps are upsampled to (the model input); thresholds: MaxBoxAcc sweep over min-max
    normalized maps."""

    size: tuple[int, int]
    threshold: float = 0.2
    thresholds: np.ndarray = field(default_factory=sweep_thresholds)


def _flag(condition: np.ndarray, defined: np.ndarray) -> np.ndarray:
    return np.where(defined, condition.astype(np.float32), np.nan).astype(np.float32)


def _localization(maps: np.ndarray, truth: np.ndarray, settings: StatisticsSettings) -> dict:
    """Box, IoU, localized flag, pointing game, energy and peak of (N, ..., h, w) maps."""
    found = localize(maps, settings.size, settings.threshold, truth)
    iou = best_iou(found["box"], truth).astype(np.float32)
    return {
        "box": found["box"],
        "iou": iou,
        "localized": _flag(iou >= IOU_LOCALIZED, ~np.isnan(iou)),
        "pointing": found["pointing"].astype(np.float32),
        "energy": found["energy"].astype(np.float32),
        "peak": found["peak"].astype(np.float32) + 0.5,  # pixel centres, input pixels
    }


def max_box_hits(maps: np.ndarray, truth: np.ndarray, settings: StatisticsSettings) -> np.ndarray:
    """For MaxBoxAcc: 1.0 where the box at each sweep threshold has IoU >= 0.5, else 0.0.

    maps: (N, h, w), one map per image (the true class); truth: (N, B, 4). Each map is
    upsampled and min-max normalized to [0, 1] (as in wsolevaluation), then boxed (largest
    component) at every threshold. Returns (N, n_thresholds), NaN for images without boxes.
    """
    up = upsample(maps, settings.size)
    low = up.min(axis=(1, 2), keepdims=True)
    span = up.max(axis=(1, 2), keepdims=True) - low
    normalized = np.where(span > 0, (up - low) / np.where(span > 0, span, 1), 0).astype(np.float32)
    iou = best_iou(sweep_boxes(normalized, settings.thresholds), truth)
    return _flag(iou >= IOU_LOCALIZED, ~np.isnan(iou))


def settled_step(ok: np.ndarray) -> np.ndarray:
    """First step from which ``ok`` (..., T) holds to the end; -1 if it fails at the last step."""
    steps = ok.shape[-1]
    trailing = np.cumprod(ok[..., ::-1], axis=-1).sum(axis=-1)  # length of the final run
    return np.where(trailing > 0, steps - trailing, -1)


def image_statistics(
    cam: np.ndarray,
    cam_reference: np.ndarray,
    logits: np.ndarray,
    logits_reference: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    settings: StatisticsSettings,
) -> dict[str, np.ndarray]:
    """All per-image statistics of a batch of images.

    cam: (N, K, T, h, w); cam_reference: (N, K, h, w); logits: (N, T, K);
    logits_reference: (N, K); labels: (N,), -1 for none; boxes: (N, B, 4), NaN-padded.
    Returns arrays keyed by store variable name (see ``transforms.store``).
    """
    n, k, steps = cam.shape[:3]
    rows = np.arange(n)
    has_label = labels >= 0
    has_boxes = ~np.isnan(boxes[..., 0]).all(axis=1)
    spiking = _localization(cam, boxes, settings)
    reference = _localization(cam_reference, boxes, settings)
    out = {f"cam_{name}": value for name, value in spiking.items()}
    out |= {f"cam_{name}_reference": value for name, value in reference.items()}
    with_reference, with_last = step_correlations(
        np.ascontiguousarray(cam, np.float32).reshape(n, k, steps, -1),
        np.ascontiguousarray(cam_reference, np.float32).reshape(n, k, -1))
    out["cam_corr_reference"] = with_reference.astype(np.float32)
    out["cam_corr_last"] = with_last.astype(np.float32)

    predicted = logits.argmax(axis=-1)  # (N, T)
    predicted_reference = logits_reference.argmax(axis=-1)
    label = np.where(has_label, labels, 0)
    label_t = label[:, None]
    # IoU of the top-1 class's box at each step, and of the true class's box.
    iou_top1 = np.take_along_axis(spiking["iou"], predicted[:, None, :], axis=1)[:, 0]
    iou_true = spiking["iou"][rows, label]  # (N, T)
    in_top5 = (np.argsort(-logits, axis=-1, kind="stable")[..., :TOP_K] == label_t[..., None]).any(-1)
    iou_top1_reference = reference["iou"][rows, predicted_reference]
    iou_true_reference = reference["iou"][rows, label]
    in_top5_reference = (
        np.argsort(-logits_reference, axis=-1, kind="stable")[:, :TOP_K] == label[:, None]
    ).any(-1)
    box_defined = (has_label & has_boxes)[:, None]

    out["predicted_class"] = predicted.astype(np.int32)
    out["predicted_class_reference"] = predicted_reference.astype(np.int32)
    out["top1_correct"] = _flag(predicted == label_t, has_label[:, None])
    out["top1_correct_reference"] = _flag(predicted_reference == label, has_label)
    out["top1_localized"] = _flag((predicted == label_t) & (iou_top1 >= IOU_LOCALIZED), box_defined)
    out["top1_localized_reference"] = _flag(
        (predicted_reference == label) & (iou_top1_reference >= IOU_LOCALIZED), box_defined[:, 0]
    )
    out["top5_localized"] = _flag(in_top5 & (iou_true >= IOU_LOCALIZED), box_defined)
    out["top5_localized_reference"] = _flag(
        in_top5_reference & (iou_true_reference >= IOU_LOCALIZED), box_defined[:, 0]
    )
    out["prediction_settled_step"] = settled_step(predicted == predicted[:, -1:]).astype(np.int32)
    out["localization_settled_step"] = np.where(
        has_boxes, settled_step(np.nan_to_num(iou_top1, nan=0.0) >= IOU_LOCALIZED), np.nan
    ).astype(np.float32)
    out["max_box_hits"] = np.where(
        has_label[:, None], max_box_hits(cam[rows, label, -1], boxes, settings), np.nan
    ).astype(np.float32)
    out["max_box_hits_reference"] = np.where(
        has_label[:, None], max_box_hits(cam_reference[rows, label], boxes, settings), np.nan
    ).astype(np.float32)
    return out


def image_statistics_threaded(
    *arrays: np.ndarray, settings: StatisticsSettings, pool: ThreadPoolExecutor | None, threads: int
) -> dict[str, np.ndarray]:
    """``image_statistics`` over groups of images in the threads of ``pool`` (the numba
    kernels and numpy release the GIL), or inline without one; the same result, image by
    image. Keep one pool (of ``threads`` threads) per process: threads made anew for every
    chunk each get a malloc arena of their own, and the process's memory grows with the data."""
    n = len(arrays[0])
    bounds = np.linspace(0, n, max(1, min(threads, n)) + 1).astype(int)
    groups = [slice(start, stop) for start, stop in itertools.pairwise(bounds)]  # views: cam is ~20 MB
    if pool is None or len(groups) == 1:
        return image_statistics(*arrays, settings)
    parts = list(pool.map(lambda rows: image_statistics(*(a[rows] for a in arrays), settings), groups))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
