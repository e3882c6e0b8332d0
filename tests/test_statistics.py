"""Per-image and dataset-level statistics: by hand, and recomputed from a whole run's store
by separate, straightforward code (tf.image.resize, per-map ndimage.label, loops)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from scipy import ndimage

from tests.conftest import run_cli
from transforms import summary
from transforms.statistics import (
    StatisticsSettings,
    image_statistics,
    image_statistics_threaded,
    settled_step,
)
from transforms.summary import dataset_summary


def test_settled_step_by_hand():
    ok = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(settled_step(ok), [1, 2, -1, 0])


def test_image_statistics_by_hand():
    """One image with a box and label 1, one without boxes or label; 2 classes, 2 steps."""
    cam = np.zeros((2, 2, 2, 4, 4), np.float32)
    cam[:, 1, :, 0:2, 0:2] = 1.0  # class 1 lights the top-left quarter at both steps
    cam[:, 0, 0, 3, 3] = 1.0  # class 0 lights the bottom-right cell at step 0 only
    logits = np.array([[[2.0, 1.0], [0.0, 3.0]]] * 2, np.float32)  # step 0: class 0; step 1: class 1
    boxes = np.full((2, 1, 4), np.nan, np.float32)
    boxes[0, 0] = (0, 0, 0.5, 0.5)
    out = image_statistics(
        cam, cam[:, :, -1], logits, logits[:, -1], np.array([1, -1]), boxes, StatisticsSettings(size=(8, 8))
    )
    # Upsampling a 2x2 block of ones in a 4x4 grid to 8x8 spreads it to rows 0..4
    # (half-pixel centres): values >= 0.2 * max reach row 4 and column 4.
    np.testing.assert_allclose(out["cam_box"][0, 1, 0], [0, 0, 5 / 8, 5 / 8])
    np.testing.assert_allclose(out["cam_iou"][0, 1], [16 / 25, 16 / 25])
    np.testing.assert_array_equal(out["cam_localized"][0, 1], [1.0, 1.0])
    assert np.isnan(out["cam_box"][0, 0, 1]).all()  # class 0 at step 1: all zero, no box
    assert out["cam_iou"][0, 0, 1] == 0.0 and out["cam_pointing"][0, 0, 0] == 0.0
    np.testing.assert_array_equal(out["predicted_class"][0], [0, 1])
    np.testing.assert_array_equal(out["top1_correct"][0], [0.0, 1.0])
    np.testing.assert_array_equal(out["top1_localized"][0], [0.0, 1.0])
    np.testing.assert_array_equal(out["top5_localized"][0], [1.0, 1.0])
    assert out["prediction_settled_step"][0] == 1 and out["localization_settled_step"][0] == 1
    # The second image has neither label nor boxes: NaN, never True, False or 0.
    for name in ("cam_iou", "cam_localized", "cam_pointing", "cam_energy", "top1_correct",
                 "top1_localized", "top5_localized", "localization_settled_step", "max_box_hits"):
        assert np.isnan(out[name][1]).all(), name
    assert not np.isnan(out["cam_box"][1, 1]).any()  # its CAM still has a box


def _resize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(cam[..., None], size, method="bilinear").numpy()[..., 0]


def _paper_box(up: np.ndarray, threshold: float) -> np.ndarray:
    if up.max() <= 0:
        return np.full(4, np.nan)
    mask = up >= threshold * up.max()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    height, width = up.shape
    return np.array([ys.min() / height, xs.min() / width, (ys.max() + 1) / height, (xs.max() + 1) / width])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_run_statistics_match_a_recomputation_from_stored_cam_and_boxes(spiking_store):
    ds = xr.open_zarr(spiking_store).load()
    size = (64, 64)
    threshold = ds.attrs["cam_threshold"]
    steps = [0, 6, ds.sizes["timestep"] - 1]
    for i in range(ds.sizes["image"]):
        truth = ds.boxes.values[i]
        truth = truth[~np.isnan(truth[:, 0])]
        for k in range(ds.sizes["class"]):
            for t in steps:
                up = _resize(ds.cam.values[i, k, t], size)
                box = _paper_box(up, threshold)
                np.testing.assert_allclose(ds.cam_box.values[i, k, t], box, atol=1e-6)
                expected_iou = 0.0 if np.isnan(box).any() else max(_iou(box, g) for g in truth)
                assert ds.cam_iou.values[i, k, t] == pytest.approx(expected_iou, abs=1e-5)
                row, col = np.unravel_index(np.argmax(up), up.shape)
                inside = np.zeros(size, bool)
                for g in truth:
                    inside[round(g[0] * 64):round(g[2] * 64), round(g[1] * 64):round(g[3] * 64)] = True
                assert ds.cam_pointing.values[i, k, t] == float(inside[row, col])
                np.testing.assert_allclose(ds.cam_peak.values[i, k, t], [row + 0.5, col + 0.5])
                positive = np.clip(up, 0, None)
                energy = positive[inside].sum() / positive.sum() if positive.sum() > 0 else 0.0
                assert ds.cam_energy.values[i, k, t] == pytest.approx(energy, abs=1e-4)

    # Dataset level, from the stored logits and per-class values.
    labels = ds.label.values
    rows = np.arange(ds.sizes["image"])
    correct = ds.logits.values.argmax(-1) == labels[:, None]
    np.testing.assert_allclose(ds.accuracy.values, correct.mean(0), atol=1e-6)
    np.testing.assert_allclose(ds.accuracy_reference.values,
                               (ds.logits_reference.values.argmax(-1) == labels).mean(), atol=1e-6)
    iou_true = ds.cam_iou.values[rows, labels]  # (image, timestep)
    np.testing.assert_allclose(ds.mean_iou.values, iou_true.mean(0), atol=1e-5)
    predicted = ds.logits.values.argmax(-1)
    iou_top1 = ds.cam_iou.values[rows[:, None], predicted, np.arange(ds.sizes["timestep"])]
    np.testing.assert_allclose(ds.top1_localization.values, (correct & (iou_top1 >= 0.5)).mean(0), atol=1e-6)
    top5 = (np.argsort(-ds.logits.values, -1)[..., :5] == labels[:, None, None]).any(-1)
    np.testing.assert_allclose(ds.top5_localization.values, (top5 & (iou_true >= 0.5)).mean(0), atol=1e-6)
    np.testing.assert_allclose(ds.pointing_accuracy.values, ds.cam_pointing.values[rows, labels].mean(0), atol=1e-6)
    hits = ds.max_box_hits.values.mean(0)
    assert ds.max_box_acc.values == pytest.approx(hits.max(), abs=1e-6)
    assert ds.max_box_acc_threshold.values == pytest.approx(ds.threshold.values[np.argmax(hits)])


def test_max_box_hits_recomputed_for_the_true_class_at_the_last_step(spiking_store):
    ds = xr.open_zarr(spiking_store).load()
    for i in range(0, ds.sizes["image"], 5):
        up = _resize(ds.cam.values[i, ds.label.values[i], -1], (64, 64))
        normalized = (up - up.min()) / (up.max() - up.min())
        truth = ds.boxes.values[i, 0]
        for j, tau in enumerate(ds.threshold.values[::7]):
            box = _paper_box((normalized >= tau).astype(float), 1.0)
            expected = float(_iou(box, truth) >= 0.5)
            assert ds.max_box_hits.values[i, j * 7] == expected


def test_rate_neuron_firing_rates_are_scale_times_keras_activations(relu_store, keras_reference):
    ds = xr.open_zarr(relu_store)
    assert list(ds.layer.values) == ["conv1", "conv2", "conv3", "conv4"]
    scale = ds.attrs["scale_firing_rates"]
    expected = scale * keras_reference["activation_means"]  # (image, layer)
    for step in range(ds.sizes["timestep"]):
        np.testing.assert_allclose(ds.firing_rate.values[:, :, step], expected, rtol=1e-4)


def test_spiking_firing_rates_count_whole_spikes(spiking_store):
    ds = xr.open_zarr(spiking_store)
    n_neurons = {"conv4": 16 * 16 * 64, "conv3": 16 * 16 * 64}
    for layer, n in n_neurons.items():
        spikes = ds.firing_rate.sel(layer=layer).values * n * ds.attrs["dt"]
        assert spikes.max() > 10
        np.testing.assert_allclose(spikes, np.round(spikes), atol=0.02)


def test_report_table_and_json(spiking_store, capsys):
    from pipeline.cli import main

    assert main(["report", str(spiking_store)]) == 0
    table = capsys.readouterr().out
    assert "top1 acc" in table and "Keras" in table and "MaxBoxAcc" in table
    assert len([line for line in table.splitlines() if line.strip()[:2].strip().isdigit()]) >= 12
    assert main(["report", str(spiking_store), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ds = xr.open_zarr(spiking_store)
    np.testing.assert_allclose(data["per_step"]["accuracy"], ds.accuracy.values, atol=1e-4)
    assert data["done"] == ds.sizes["image"]


def test_statistics_do_not_depend_on_chunking_or_batch_size(spiking_store, store_dir):
    from tests.conftest import N_IMAGES

    out = store_dir / "rechunked.zarr"
    assert run_cli("--n-steps", "12", "--limit", str(N_IMAGES), "--images-per-chunk", "10",
                   "--batch-size", "5", "--output", str(out)) == 0
    one, other = xr.open_zarr(spiking_store).load(), xr.open_zarr(out).load()
    assert other.cam.encoding["chunks"][0] == 10
    for name in one.data_vars:
        xr.testing.assert_identical(one[name], other[name])


def test_statistics_in_threads_equal_those_in_one_call():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    n, k, steps = 7, 4, 3
    cam = rng.normal(size=(n, k, steps, 4, 4)).astype(np.float32)
    cam_reference = rng.normal(size=(n, k, 4, 4)).astype(np.float32)
    logits, logits_reference = rng.normal(size=(n, steps, k)), rng.normal(size=(n, k))
    labels = rng.integers(-1, k, n)
    corner = rng.uniform(0, 0.5, (n, 1, 2))
    boxes = np.concatenate([corner, corner + 0.4], axis=-1).astype(np.float32)
    settings = StatisticsSettings(size=(8, 8))
    arrays = (cam, cam_reference, logits, logits_reference, labels, boxes)
    expected = image_statistics(*arrays, settings)
    with ThreadPoolExecutor(3) as pool:
        threaded = image_statistics_threaded(*arrays, settings=settings, pool=pool, threads=3)
    assert threaded.keys() == expected.keys()
    for name, values in expected.items():
        np.testing.assert_array_equal(threaded[name], values, err_msg=name)


@pytest.mark.parametrize("read_bytes", [1, 20_000])  # one chunk per read; two of cam_iou's 8-image chunks
def test_summary_read_in_blocks_of_chunks_equals_one_read(spiking_store, monkeypatch, read_bytes):
    ds = xr.open_zarr(spiking_store, chunks=None)
    whole = dataset_summary(ds)
    monkeypatch.setattr(summary, "READ_BYTES", read_bytes)
    xr.testing.assert_identical(dataset_summary(ds), whole)


def test_writing_the_summary_replaces_what_was_there(spiking_store, tmp_path):
    """A store's summary written again holds the new values everywhere, NaN included (zarr
    writes no chunk equal to the fill value: it must delete the earlier one)."""
    store = tmp_path / "store.zarr"
    shutil.copytree(spiking_store, store)
    before = xr.open_zarr(store, chunks=None).load()
    assert not np.isnan(before["accuracy"].values).all()
    status = zarr.open_array(store / "status", mode="r+")
    status[:] = 0  # every image never written: nothing to summarize
    written = summary.write_summary(str(store))
    after = xr.open_zarr(store, chunks=None)
    for name in written:
        assert np.isnan(after[name].values).all(), name
    status[:] = before["status"].values
    written = summary.write_summary(str(store))
    for name in written:
        np.testing.assert_array_equal(xr.open_zarr(store, chunks=None)[name].values, before[name].values, err_msg=name)
