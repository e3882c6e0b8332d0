"""The sample generator: boxes are the ink's bounds, and tfds reads back what was written."""

from __future__ import annotations

import json

import numpy as np

from pipeline.sample import (
    CANVAS,
    LABEL_NAMES,
    SAMPLE_DIR,
    place_digits,
    write_tfds_dataset,
)


def _digits(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    digits = np.zeros((n, 28, 28), np.uint8)
    for d in digits:  # a random filled rectangle of "ink" per digit
        top, left = rng.integers(0, 14, 2)
        d[top : top + rng.integers(3, 14), left : left + rng.integers(3, 14)] = 200
    return digits


def test_boxes_are_the_ink_bounds_in_tfds_convention():
    canvases = place_digits(_digits(20), np.arange(20) % 10, np.random.default_rng(0))
    for image, box in zip(canvases.images[..., 0], canvases.boxes):
        rows, cols = np.nonzero(image)
        expected = [rows.min() / CANVAS, cols.min() / CANVAS, (rows.max() + 1) / CANVAS, (cols.max() + 1) / CANVAS]
        np.testing.assert_allclose(box, expected)


def test_tfds_directory_reads_back(tmp_path):
    import tensorflow_datasets as tfds

    canvases = place_digits(_digits(7), np.arange(7), np.random.default_rng(1))
    directory = write_tfds_dataset({"test": canvases}, tmp_path)
    builder = tfds.builder_from_directory(str(directory))
    assert builder.info.features["label"].names == LABEL_NAMES
    rows = list(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)))
    assert len(rows) == 7
    order = np.argsort([int(r["label"]) for r in rows])  # tfds shuffles examples by key hash
    for i, row in zip(range(7), [rows[j] for j in order]):
        np.testing.assert_array_equal(row["image"], canvases.images[i])
        np.testing.assert_allclose(row["objects"]["bbox"][0], canvases.boxes[i])


def test_shipped_sample_is_small_and_documented():
    info = json.loads((SAMPLE_DIR / "sample.json").read_text())
    size = sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file())
    assert size < 2_000_000
    assert info["splits"] == {"test": 300}
    assert info["keras_test_accuracy"] > 0.9
