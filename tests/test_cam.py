"""The CAM kernel against a direct loop, and the grid convention."""

import numpy as np

from transforms.cam import class_activation_maps, grid_centres, step_class_activation_maps


def test_cam_equals_weighted_sum_of_channels():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)  # (n, T, H, W, C)
    weights = rng.normal(size=(6, 7)).astype(np.float32)
    cams = class_activation_maps(features, weights)
    assert cams.shape == (2, 3, 7, 4, 5)
    expected = np.zeros((2, 3, 7, 4, 5))
    for k in range(7):
        for c in range(6):
            expected[:, :, k] += weights[c, k] * features[..., c]
    np.testing.assert_allclose(cams, expected, rtol=1e-5, atol=1e-5)
    # The spatial mean of the CAM is the Dense layer applied to the pooled features.
    np.testing.assert_allclose(cams.mean((-2, -1)), features.mean((2, 3)) @ weights, rtol=1e-4, atol=1e-5)
    # Per-step CAMs in the store's order (class before step) are the same maps.
    np.testing.assert_allclose(step_class_activation_maps(features, weights), np.swapaxes(cams, 1, 2), rtol=1e-6)


def test_grid_centres_in_input_pixels():
    np.testing.assert_allclose(grid_centres(64, 8), [4, 12, 20, 28, 36, 44, 52, 60])
    np.testing.assert_allclose(grid_centres(10, 10), np.arange(10) + 0.5)
