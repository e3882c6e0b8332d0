"""Localization kernels: reference values worked out by hand, and properties (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from tests.map_helpers import boxes_of, peaks_of
from transforms.localization import best_iou, iou, localize, upsample

NAN_BOX = [np.nan] * 4


def test_two_blobs_give_the_larger_ones_box():
    cam = np.zeros((10, 10))
    cam[1:3, 1:3] = 1.0  # small blob (4 px) holding the maximum
    cam[5:9, 4:9] = 0.5  # large blob (20 px), above 0.2 * max
    np.testing.assert_allclose(boxes_of(cam[None], 0.2)[0], [0.5, 0.4, 0.9, 0.9])
    # Above 0.6 * max only the small blob survives.
    np.testing.assert_allclose(boxes_of(cam[None], 0.6)[0], [0.1, 0.1, 0.3, 0.3])


def test_diagonal_pixels_are_connected_and_maps_are_not():
    cams = np.zeros((2, 4, 4))
    cams[0, 0, 0] = cams[0, 1, 1] = cams[0, 2, 2] = 1.0  # one 8-connected blob of 3
    cams[1, 3, 3] = 1.0  # touching map 0's corner across the stack must not join it
    np.testing.assert_allclose(boxes_of(cams), [[0, 0, 0.75, 0.75], [0.75, 0.75, 1, 1]])


def test_all_zero_or_negative_cam_has_no_box():
    cams = np.stack([np.zeros((4, 4)), -np.ones((4, 4))])
    assert np.isnan(boxes_of(cams)).all()
    truth = np.array([[[0, 0, 0.5, 0.5]], [[0, 0, 0.5, 0.5]]], np.float32)
    np.testing.assert_array_equal(best_iou(boxes_of(cams), truth), [0.0, 0.0])


def test_known_iou():
    # [0,0,2,2] and [1,1,3,3]: intersection 1, union 7.
    assert iou(np.array([0, 0, 2, 2.0]), np.array([1, 1, 3, 3.0])) == 1 / 7
    assert iou(np.array([0, 0, 1, 1.0]), np.array([2, 2, 3, 3.0])) == 0.0


def test_best_iou_picks_the_best_box_and_is_nan_without_boxes():
    predicted = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]], np.float32)
    truth = np.array(
        [[[0.5, 0.5, 1, 1], [0, 0, 0.5, 0.25]], [NAN_BOX, NAN_BOX]], np.float32
    )
    result = best_iou(predicted, truth)
    assert result[0] == 0.5 and np.isnan(result[1])


def test_peak_on_a_box_edge_counts_as_inside():
    maps = np.zeros((3, 8, 8))
    maps[0, 2, 5] = 1.0  # row 2 is the box's first row: inside
    maps[1, 6, 3] = 1.0  # row 6 is just past the box's last row (rows 2..5): outside
    maps[2, 5, 2] = 1.0  # row 5, col 2: the box's bottom-left pixel: inside
    truth = np.tile(np.array([[2 / 8, 2 / 8, 6 / 8, 6 / 8]], np.float32), (3, 1, 1))
    result = peaks_of(maps[:, None], truth)  # one map per image
    np.testing.assert_array_equal(result["pointing"][:, 0], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(result["peak"][:, 0], [[2, 5], [6, 3], [5, 2]])
    no_boxes = np.full((3, 1, 4), np.nan, np.float32)
    assert np.isnan(peaks_of(maps[:, None], no_boxes)["pointing"]).all()


def test_energy_in_boxes_counts_positive_mass_only():
    maps = np.zeros((2, 4, 4))
    maps[0, 0, 0] = 3.0  # inside the box
    maps[0, 3, 3] = 1.0  # outside
    maps[0, 2, 2] = -5.0  # negative: ignored
    maps[1] = -1.0  # no positive mass at all
    truth = np.tile(np.array([[0, 0, 0.5, 0.5]], np.float32), (2, 1, 1))
    np.testing.assert_allclose(peaks_of(maps[:, None], truth)["energy"][:, 0], [0.75, 0.0])


def test_bilinear_equals_tensorflow_resize_bit_for_bit():
    import tensorflow as tf

    cam = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
    for size in ((40, 32), (64, 7), (5, 4)):
        expected = tf.image.resize(cam.reshape(6, 5, 4)[..., None], size, method="bilinear").numpy()[..., 0]
        np.testing.assert_array_equal(upsample(cam, size).reshape((6,) + size), expected)


def test_localize_equals_localizing_the_upsampled_maps():
    rng = np.random.default_rng(1)
    smooth = rng.normal(size=(3, 4, 6, 6)).astype(np.float32)  # several blobs per map
    smooth[0, 0] = 0.0  # no positive value: no box, no mass
    smooth[1, 1] = -1.0
    truth = np.full((3, 2, 4), np.nan, np.float32)
    truth[0, 0] = (0.1, 0.2, 0.6, 0.9)
    truth[1, :] = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    up = upsample(smooth, (24, 30))
    got = localize(smooth, (24, 30), 0.3, truth)
    for name, value in localize(up, (24, 30), 0.3, truth).items():
        np.testing.assert_array_equal(got[name], value)
    assert np.isnan(got["box"][0, 0]).all() and np.isnan(got["box"][1, 1]).all()
    assert not np.isnan(got["box"][2]).any()


coordinate = st.floats(0, 1, allow_nan=False)


@st.composite
def boxes(draw):
    y0, y1 = sorted((draw(coordinate), draw(coordinate)))
    x0, x1 = sorted((draw(coordinate), draw(coordinate)))
    return np.array([y0, x0, y1, x1])


@given(boxes(), boxes())
def test_iou_is_symmetric_and_bounded(a, b):
    value = iou(a, b)
    assert 0.0 <= value <= 1.0
    assert value == iou(b, a)


@given(boxes())
def test_iou_with_itself_is_one_for_boxes_with_area(a):
    area = (a[2] - a[0]) * (a[3] - a[1])
    assert iou(a, a) == (1.0 if area > 0 else 0.0)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_cam_box_is_tight_around_kept_pixels(height, width, seed):
    cam = np.random.default_rng(seed).normal(size=(height, width))
    box = boxes_of(cam[None], 0.2)[0]
    if cam.max() <= 0:
        assert np.isnan(box).all()
        return
    rows = slice(round(box[0] * height), round(box[2] * height))
    cols = slice(round(box[1] * width), round(box[3] * width))
    kept = cam >= 0.2 * cam.max()
    assert kept[rows, cols].any()
    # The box is tight: every edge row and column holds a kept pixel.
    inner = kept[rows, cols]
    assert inner[0].any() and inner[-1].any() and inner[:, 0].any() and inner[:, -1].any()
