"""Preprocessing by hand, raw-pixel records, and inputs on a non-local file system."""

from __future__ import annotations

import numpy as np
import xarray as xr

from tests import records_factory as rf
from tests.conftest import run_cli
from transforms.nengo_shim import tf, tf_keras
from transforms.preprocess import Preprocessing, fit_to_input


def test_scalings_by_hand():
    image = np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)  # (1, 2, 3)
    shape = (1, 2, 3)
    np.testing.assert_allclose(Preprocessing().apply(image, shape), image / 255.0)
    mean = Preprocessing("mean", (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)).apply(image, shape)
    np.testing.assert_allclose(mean, [[[0, 0, 0], [15, 7.5, 6]]])
    np.testing.assert_array_equal(Preprocessing("none").apply(image, shape), image.astype(np.float32))
    vgg = Preprocessing("keras", keras_app="vgg19").apply(image, shape)
    np.testing.assert_allclose(vgg, tf_keras.applications.vgg19.preprocess_input(image.astype(np.float32)))


def test_channels_and_size():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 100
    np.testing.assert_allclose(fit_to_input(rgb, (4, 4, 1)), np.full((4, 4, 1), 29.9), rtol=1e-6)
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    np.testing.assert_array_equal(fit_to_input(gray, (4, 4, 3)), np.repeat(gray[..., None], 3, -1))
    resized = fit_to_input(gray, (8, 8, 1))
    expected = tf.image.resize(gray[..., None].astype(np.float32), (8, 8), method="bilinear").numpy()
    np.testing.assert_allclose(resized, expected)


def test_raw_pixels_on_a_non_local_file_system_equal_png_records(sample_images, relu_store, tmp_path):
    """Raw uint8 pixels (shape from image/height, width, channels) in a file on TensorFlow's
    in-memory file system (ram://, standing in for gs://): same CAMs as the sample's PNGs."""
    images, labels, boxes = sample_images["image"][:4], sample_images["label"][:4], sample_images["bbox"][:4]
    shape = {"image/height": 64, "image/width": 64, "image/channels": 1}
    records = [rf.example(im.tobytes(), int(lab), box, shape) for im, lab, box in zip(images, labels, boxes)]
    rf.write("ram://bucket/raw-00000.tfrecord", records)
    out = str(tmp_path / "raw.zarr")
    assert run_cli("--input", "ram://bucket/raw-*.tfrecord", "--neuron", "relu", "--n-steps", "1",
                   "--output", out) == 0
    ds = xr.open_zarr(out)
    assert list(ds.image_id.values) == [f"raw-00000.tfrecord:{i}" for i in range(4)]
    reference = xr.open_zarr(relu_store)
    np.testing.assert_allclose(ds.cam.values[:, :, 0], reference.cam.values[:4, :, 0], rtol=1e-5, atol=1e-5)
