"""The compiled largest-component and peak kernels against scipy.ndimage and numpy, map by map."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from tests.map_helpers import boxes_of, peaks_of, pearson
from transforms.localization import in_boxes_mask, localize, sweep_boxes, upsample
from transforms.map_kernels import _argmax, step_correlations
from transforms.statistics import sweep_thresholds


def scipy_box(mask: np.ndarray) -> np.ndarray:
    """Box of the largest 8-connected component of one (H, W) mask; ties to the first
    component in row-major order (ndimage numbers labels in that order)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.full(4, np.nan, np.float32)
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = ndimage.find_objects(labels)[int(np.argmax(sizes))]
    height, width = mask.shape
    return np.array([rows.start / height, cols.start / width, rows.stop / height, cols.stop / width], np.float32)


def scipy_cam_box(cam: np.ndarray, threshold: float) -> np.ndarray:
    peak = cam.max()
    return scipy_box(cam >= np.float32(threshold) * peak) if peak > 0 else np.full(4, np.nan, np.float32)


# Few distinct levels make plateaus, touching blobs and equally large blobs (ties) common.
maps = st.tuples(st.integers(1, 4), st.integers(1, 14), st.integers(1, 14), st.integers(0, 2**32 - 1)).map(
    lambda a: (np.random.default_rng(a[3]).integers(-1, 4, size=a[:3]) / 3).astype(np.float32)
)


@settings(max_examples=300, deadline=None)
@given(maps, st.sampled_from([0.2, 0.5, 1.0]))
def test_boxes_equal_scipy_labelling(stack, threshold):
    expected = np.stack([scipy_cam_box(m, threshold) for m in stack])
    np.testing.assert_array_equal(boxes_of(stack, threshold), expected)


# Rows wider than 64 pixels span several 64-bit words of the run finder; few levels make
# runs that cross word boundaries common.
wide_maps = st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(60, 200), st.integers(0, 2**32 - 1)).map(
    lambda a: (np.random.default_rng(a[3]).random(a[:3]) < 0.9).astype(np.float32)
)


@settings(max_examples=200, deadline=None)
@given(wide_maps)
def test_wide_rows_equal_scipy_labelling(stack):
    expected = np.stack([scipy_cam_box(m, 1.0) for m in stack])
    np.testing.assert_array_equal(boxes_of(stack, 1.0), expected)


def test_a_run_across_word_boundaries():
    mask = np.zeros((2, 200), np.float32)
    mask[0, 60:130] = 1  # bits 60-129: three words
    mask[1, 128:200] = 1  # touches it diagonally at 129, runs to the last pixel
    np.testing.assert_array_equal(boxes_of(mask[None], 1.0)[0], np.array([0, 0.3, 1, 1], np.float32))


@settings(max_examples=300, deadline=None)
@given(maps)
def test_sweep_equals_labelling_each_threshold(stack):
    values = stack[0]
    thresholds = sweep_thresholds()
    expected = np.stack([scipy_box(values >= t) for t in thresholds])
    np.testing.assert_array_equal(sweep_boxes(values, thresholds), expected)


# Maps whose top and bottom rows hold one value each (the sweep adds such margins as one
# block): blocks above, below or between the other values' levels, or equal to them.
blocked_maps = st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(-1, 4), st.integers(-1, 4),
                         st.integers(1, 9), st.integers(0, 2**32 - 1)).map(lambda a: _blocked(*a))


def _blocked(top: int, bottom: int, top_level: int, bottom_level: int, width: int, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).integers(-1, 4, size=(6, width)).astype(np.float32)
    values[:top] = top_level
    values[6 - bottom:] = bottom_level
    return values / 4


@settings(max_examples=300, deadline=None)
@given(blocked_maps)
def test_sweep_with_constant_margins_equals_labelling_each_threshold(values):
    thresholds = np.linspace(-0.3, 1.0, 14)
    expected = np.stack([scipy_box(values >= t) for t in thresholds])
    np.testing.assert_array_equal(sweep_boxes(values, thresholds), expected)


def test_smooth_maps_equal_scipy():
    rng = np.random.default_rng(1)
    stack = ndimage.gaussian_filter(rng.normal(size=(40, 64, 64)), (0, 3, 3)).astype(np.float32)
    expected = np.stack([scipy_cam_box(m, 0.2) for m in stack])
    np.testing.assert_array_equal(boxes_of(stack, 0.2), expected)
    values = (stack[0] - stack[0].min()) / np.ptp(stack[0])
    expected = np.stack([scipy_box(values >= t) for t in sweep_thresholds()])
    np.testing.assert_array_equal(sweep_boxes(values, sweep_thresholds()), expected)


def test_equal_blobs_go_to_the_first_in_row_major_order():
    mask = np.zeros((5, 5), np.float32)
    mask[0, 3:5] = 1  # first pixel (0, 3)
    mask[3:5, 0] = 1  # same size, first pixel (3, 0)
    first = np.array([0, 0.6, 0.2, 1.0], np.float32)
    np.testing.assert_array_equal(boxes_of(mask[None], 1.0)[0], first)
    np.testing.assert_array_equal(sweep_boxes(mask, [0.5])[0], first)


def test_a_run_joins_only_runs_it_touches():
    # Row 1's first run joins both pixels of row 0, so that component spans columns 0-4;
    # the pixel at (1, 6) touches none of it and must stay a blob of its own.
    mask = np.array([[1, 0, 0, 0, 1, 0, 0],
                     [1, 1, 1, 1, 1, 0, 1]], np.float32)
    np.testing.assert_array_equal(boxes_of(mask[None], 1.0)[0], np.array([0, 0, 1, 5 / 7], np.float32))
    np.testing.assert_array_equal(boxes_of(mask[None, ::-1], 1.0)[0], np.array([0, 0, 1, 5 / 7], np.float32))


def test_sweep_thresholds_must_be_ascending():
    with pytest.raises(ValueError, match="ascending"):
        sweep_boxes(np.ones((2, 2)), [0.5, 0.1])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_peaks_equal_numpy(n, per_image, size, seed):
    rng = np.random.default_rng(seed)
    maps = (rng.integers(-2, 3, size=(n, per_image, size, size)) / 2).astype(np.float32)  # ties at the peak
    corner = rng.uniform(0, 0.6, size=(n, 1, 2))
    truth = np.concatenate([corner, corner + rng.uniform(0.2, 0.5, size=(n, 1, 2))], axis=-1).astype(np.float32)
    truth[0] = np.nan  # an image without boxes
    inside = in_boxes_mask(truth, (size, size))[:, None]
    flat = maps.reshape(n, per_image, -1)
    index = flat.argmax(-1)
    positive = np.clip(maps, 0, None)
    total, within = positive.sum((-2, -1)), (positive * inside).sum((-2, -1))
    share = np.divide(within, total, out=np.zeros_like(total), where=total > 0)
    has_gt = np.arange(n)[:, None] > 0
    result = peaks_of(maps, truth)
    np.testing.assert_array_equal(result["peak"], np.stack([index // size, index % size], -1))
    hit = np.take_along_axis(np.broadcast_to(inside, maps.shape).reshape(n, per_image, -1), index[..., None], -1)[..., 0]
    np.testing.assert_array_equal(result["pointing"], np.where(has_gt, hit, np.nan))
    np.testing.assert_allclose(result["energy"], np.where(has_gt, share, np.nan), rtol=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_argmax_equals_numpy(n, seed):
    # Few levels, with -0.0 beside 0.0 and infinities: the search orders floats by their
    # bits, where -0.0 and 0.0 must still tie (numpy: the first of them).
    levels = np.array([-np.inf, -2.5, -1e-40, -0.0, 0.0, 1e-40, 3.0, np.inf], np.float32)
    rng = np.random.default_rng(seed)
    values = levels[rng.integers(0, len(levels) - int(rng.integers(0, 5)), size=n)]
    assert _argmax(values) == np.argmax(values)


def test_step_correlations_equal_numpy():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(2, 3, 5, 4, 6)).astype(np.float32)  # (N, K, T, h, w)
    reference = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    maps[0, 1, 2] = 7.0  # a constant map: its correlations are undefined
    reference[1, 2] = -1.0  # a constant reference: every step's correlation with it is
    maps[1, 0, -1] = 0.0  # a constant last step: every step's correlation with it is
    with_reference, with_last = step_correlations(maps.reshape(2, 3, 5, -1), reference.reshape(2, 3, -1))
    as64 = maps.astype(np.float64)
    np.testing.assert_allclose(with_reference, pearson(as64, reference[:, :, None].astype(np.float64)), rtol=1e-9)
    np.testing.assert_allclose(with_last, pearson(as64, as64[:, :, -1:]), rtol=1e-9)
    assert np.isnan(with_reference[0, 1, 2]) and np.isnan(with_reference[1, 2]).all()
    assert np.isnan(with_last[1, 0]).all() and np.isnan(with_last[0, 1, 2])
    assert np.isfinite(with_reference).sum() == 30 - 7 and np.isfinite(with_last).sum() == 30 - 6


# Maps with all-zero rows at the top and bottom (localize skips the rows they upsample
# to): signed values whose peak may lie in the zeros, -0.0 beside 0.0, and a positive
# peak so small (the least subnormal) that the box threshold times it is 0.0.
margin_maps = st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 2**32 - 1)).map(
    lambda a: _with_margins(*a))


def _with_margins(top: int, bottom: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = (rng.integers(-2, 3, size=(2, 3, 7, 5)) / 2).astype(np.float32)
    maps[0, 1] = np.where(maps[0, 1] > 0, np.float32(1e-45), maps[0, 1])
    maps[1, 0] = -np.abs(maps[1, 0])
    maps[:, :, :top] = 0.0
    maps[:, :, 7 - bottom:] = -0.0
    return maps


@settings(max_examples=300, deadline=None)
@given(margin_maps, st.sampled_from([(21, 15), (28, 10), (7, 5)]))
def test_maps_with_zero_margins_localize_as_numpy_and_scipy_on_their_upsampled_maps(maps, size):
    truth = np.array([[[0.1, 0.2, 0.6, 0.9]], [[np.nan] * 4]], np.float32)
    up = upsample(maps, size)
    found = localize(maps, size, 0.2, truth)
    flat = up.reshape(2, 3, -1)
    index = flat.argmax(-1)
    np.testing.assert_array_equal(found["peak"], np.stack([index // size[1], index % size[1]], -1))
    expected = np.stack([[scipy_cam_box(m, 0.2) for m in image] for image in up])
    np.testing.assert_array_equal(found["box"], expected)
    positive = np.clip(up[0], 0, None).astype(np.float64)
    total, within = positive.sum((-2, -1)), (positive * in_boxes_mask(truth[:1], size)).sum((-2, -1))
    share = np.divide(within, total, out=np.zeros_like(total), where=total > 0)
    np.testing.assert_allclose(found["energy"][0], share, rtol=1e-6)


@pytest.mark.parametrize("value", [2.5, 1e-40, 0.0, -0.0, -3.0])
def test_constant_maps_localize_as_their_upsampled_maps(value):
    # A constant map upsamples to the same constant: peak at the first pixel, box the
    # whole map where it is positive (else none), energy the share of pixels in the boxes.
    maps = np.full((2, 3, 4, 4), value, np.float32)
    maps[1, 2, 3, 3] = 9.0  # not constant: the general path, beside constant ones
    truth = np.full((2, 1, 4), np.nan, np.float32)
    truth[:, 0] = [0.0, 0.0, 0.5, 0.25]  # 32 of 16 x 16 pixel centres: 1/8
    found = localize(maps, (16, 16), 0.2, truth)
    positive = value > 0
    for i, m in [(0, 0), (0, 2), (1, 0), (1, 1)]:
        np.testing.assert_array_equal(found["peak"][i, m], [0, 0])
        np.testing.assert_array_equal(found["box"][i, m], [0, 0, 1, 1] if positive else [np.nan] * 4)
        assert found["pointing"][i, m] == 1.0  # pixel (0, 0) is in the box
        assert found["energy"][i, m] == (0.125 if positive else 0.0)
    np.testing.assert_array_equal(found["peak"][1, 2], [14, 14])  # the first pixel reading only cell (3, 3)
