"""End-to-end runs on the shipped sample, checked against independent references."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import xarray as xr

from pipeline.sample import LABEL_NAMES
from tests.conftest import N_IMAGES, SMALL_RUN, SPIKING_ARGS, run_cli


def test_rate_neuron_cam_equals_keras_cam_at_every_step(relu_store, keras_reference, sample_images):
    ds = xr.open_zarr(relu_store)
    assert (ds.status.values == 1).all()
    cam = ds.cam.values.astype(np.float64)  # (image, class, timestep, y, x)
    expected = keras_reference["cam"]  # (image, class, y, x)
    scale = np.abs(expected).max()
    for step in range(ds.sizes["timestep"]):
        np.testing.assert_allclose(cam[:, :, step], expected, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(ds.cam_reference.values, expected, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(ds.logits_reference.values, keras_reference["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.label.values, sample_images["label"])
    np.testing.assert_allclose(ds.boxes.values[:, 0], sample_images["bbox"])
    assert np.isnan(ds.boxes.values[:, 1:]).all()
    np.testing.assert_array_equal(ds.dense_weights.values, keras_reference["weights"])
    np.testing.assert_array_equal(ds.dense_bias.values, keras_reference["bias"])


def test_spatial_mean_of_cam_plus_bias_is_logits_at_every_step(spiking_store):
    """The probe synapse equals the network synapse by default, so the probed maps are what
    the GAP reads: mean_yx(cam) + bias == logits at every step, spikes and all."""
    ds = xr.open_zarr(spiking_store)
    assert ds.attrs["neuron"] == "spiking-relu"
    assert ds.attrs["synapse"] == ds.attrs["probe_synapse"] != "none"
    from_cam = ds.cam.mean(("y", "x")).transpose("image", "timestep", "class") + ds.dense_bias
    logits = ds.logits.transpose("image", "timestep", "class")
    scale = float(np.abs(logits).max())
    np.testing.assert_allclose(from_cam.values, logits.values, rtol=1e-5, atol=1e-5 * scale)
    # The spiking maps are not the rate maps: they start from zero and approach them.
    reference = ds.cam_reference.values
    assert np.abs(ds.cam.isel(timestep=0).values).max() == 0.0
    last = ds.cam.isel(timestep=-1).values
    err_last = np.abs(last - reference).mean()
    err_mid = np.abs(ds.cam.isel(timestep=5).values - reference).mean()
    assert 0 < err_last < err_mid


def test_two_worker_processes_give_an_identical_store(spiking_store, store_dir):
    out = store_dir / "spiking_2workers.zarr"
    code = run_cli(
        *SPIKING_ARGS, "--output", str(out),
        "--direct_num_workers=2", "--direct_running_mode=multi_processing",
    )
    assert code == 0
    one, two = xr.open_zarr(spiking_store), xr.open_zarr(out)
    xr.testing.assert_identical(one.load(), two.load())
    assert list(two.image_id.values) == [
        f"digits_on_canvas-test.tfrecord-00000-of-00001:{i}" for i in range(N_IMAGES)
    ]


OPEN_STORE = """
import json, sys, xarray as xr
ds = xr.open_zarr(sys.argv[1])
print(json.dumps({
    "dims": dict(ds.sizes),
    "coords": sorted(ds.coords),
    "variables": {name: list(v.dims) for name, v in ds.data_vars.items()},
    "classes": [str(c) for c in ds["class"].values],
    "time": ds.time.values.tolist(),
    "attrs": sorted(ds.attrs),
}))
"""


def test_store_opens_in_a_fresh_process_with_the_store_md_interface(spiking_store):
    result = subprocess.run(
        [sys.executable, "-c", OPEN_STORE, str(spiking_store)], capture_output=True, text=True, check=True
    )
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["dims"] == {
        "image": N_IMAGES, "class": 10, "timestep": 12, "y": 16, "x": 16, "channel": 64, "box": 8, "coord": 4,
        "axis": 2, "layer": 4, "threshold": 100, "file": 1,
    }
    assert {"image", "image_id", "class", "timestep", "time", "y", "x", "channel"} <= set(info["coords"])
    required = {
        "cam": ["image", "class", "timestep", "y", "x"],
        "cam_reference": ["image", "class", "y", "x"],
        "logits": ["image", "timestep", "class"],
        "logits_reference": ["image", "class"],
        "label": ["image"],
        "boxes": ["image", "box", "coord"],
        "status": ["image"],
        "error": ["image"],
        "dense_weights": ["channel", "class"],
        "dense_bias": ["class"],
    }
    assert {name: info["variables"][name] for name in required} == required
    from transforms.store import PER_IMAGE, SUMMARY

    files = {"file_path", "file_n_records", "file_error"}
    assert set(info["variables"]) == set(required) | set(PER_IMAGE) | set(SUMMARY) | files
    assert info["classes"] == LABEL_NAMES
    np.testing.assert_allclose(info["time"], (np.arange(12) + 1) * 0.001)
    for key in ("model_file", "model_sha256", "neuron", "n_steps", "dt", "synapse", "probe_synapse",
                "scale_firing_rates", "dataset", "package_versions"):
        assert key in info["attrs"]


def test_every_chunk_is_one_file_in_its_arrays_folder(spiking_store):
    # Flat chunk keys (c.0.0...): nested ones cost the writer a mkdir per level and chunk.
    for array in ("cam", "status", "error", "image_id"):
        entries = [p for p in (spiking_store / array).iterdir() if p.name != "zarr.json"]
        assert entries and all(p.is_file() and p.name.startswith("c.") for p in entries), (array, entries)


def test_existing_output_is_refused_before_any_work(spiking_store, capsys):
    before = sorted(p.name for p in spiking_store.iterdir())
    assert run_cli("--limit", "2", "--output", str(spiking_store)) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in spiking_store.iterdir()) == before


def test_model_without_gap_dense_head_is_refused(tmp_path, capsys):
    from transforms.nengo_shim import tf_keras

    inputs = tf_keras.Input((64, 64, 1))
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = tf_keras.layers.Flatten()(x)
    model_path = tmp_path / "flatten.h5"
    tf_keras.Model(inputs, tf_keras.layers.Dense(10, name="out")(x)).save(model_path)
    out = tmp_path / "never.zarr"
    assert run_cli("--model", str(model_path), "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert str(model_path) in err and "GlobalAveragePooling2D" in err
    assert not out.exists()


def test_dense_layers_on_feature_maps_run_on_the_fast_engine_with_kerass_cams(tmp_path, sample_images):
    """Per-pixel Dense layers, the CAM feature layer among them, which NengoDL's converter
    could not convert (it takes a Dense's input as flat): with rate neurons, every step's
    CAM is the Keras model's."""
    from transforms.nengo_shim import tf_keras

    layers = tf_keras.layers
    inputs = tf_keras.Input((64, 64, 1))
    x = layers.Dense(8, activation="relu")(layers.Conv2D(8, 3, strides=2, activation="relu")(inputs))
    x = layers.Dense(8, activation="relu", name="features")(layers.Conv2D(8, 3, strides=2, padding="same")(x))
    model = tf_keras.Model(inputs, layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(x)))
    model_path, out = tmp_path / "pixel_dense.h5", tmp_path / "pixel_dense.zarr"
    model.save(model_path)
    assert run_cli("--model", str(model_path), "--neuron", "relu", "--n-steps", "2", "--limit", "8",
                   "--output", str(out)) == 0
    ds = xr.open_zarr(out)
    assert ds.attrs["engine"] == "fast" and (ds.status.values == 1).all()
    features = tf_keras.Model(inputs, model.get_layer("features").output)(sample_images["image"][:8] / 255.0)
    expected = np.einsum("nyxc,ck->nkyx", features.numpy(), model.get_layer("logits").get_weights()[0])
    assert np.abs(expected).max() > 0
    for step in range(2):
        np.testing.assert_allclose(ds.cam.values[:, :, step], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_a_model_that_rescales_its_pixels_itself_runs_on_the_fast_engine(tmp_path, relu_store):
    """The shipped model behind a Rescaling(1/255) layer (a TensorNode to NengoDL's
    converter), given 0..255 pixels (--scaling none): the fast engine, and the CAMs of the
    shipped model on pixels / 255."""
    from pipeline.sample import SAMPLE_MODEL
    from transforms.nengo_shim import tf_keras

    shipped = tf_keras.models.load_model(str(SAMPLE_MODEL), compile=False)
    x = inputs = tf_keras.Input((64, 64, 1))
    x = tf_keras.layers.Rescaling(1 / 255)(x)
    for layer in shipped.layers[1:]:
        x = layer(x)
    model_path, out = tmp_path / "rescaling.h5", tmp_path / "rescaling.zarr"
    tf_keras.Model(inputs, x).save(model_path)
    assert run_cli("--model", str(model_path), "--scaling", "none", "--neuron", "relu", "--n-steps", "1",
                   "--limit", "8", "--output", str(out)) == 0
    ds = xr.open_zarr(out)
    assert ds.attrs["engine"] == "fast" and (ds.status.values == 1).all()
    expected = xr.open_zarr(relu_store).cam.values[:8, :, 0]
    np.testing.assert_allclose(ds.cam.values[:, :, 0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_networks_are_built_once_per_worker_and_reused_for_every_chunk(store_dir, relu_store):
    from transforms.cam_chunks import Networks

    before = Networks.builds
    out = store_dir / "three_chunks.zarr"
    assert run_cli("--neuron", "relu", "--n-steps", "1", "--limit", "12", "--images-per-chunk", "4",
                   "--batch-size", "3", "--output", str(out)) == 0
    assert Networks.builds == before + 1
    ds = xr.open_zarr(out)
    assert ds.cam.encoding["chunks"][0] == 4 and (ds.status.values == 1).all()
    np.testing.assert_allclose(ds.cam.values[:, :, 0], xr.open_zarr(relu_store).cam.values[:12, :, 0],
                               rtol=1e-6, atol=1e-6)


def test_a_worker_sets_its_tensorflow_threads_before_its_first_decode(tmp_path, sample_images):
    """In a worker process, decoding a record is TensorFlow's first op, after which its
    thread counts are fixed: the decoding DoFn sets the worker's share of the cores first
    (before, the engine ran with TensorFlow's default threads beside the other workers)."""
    from tests.records_factory import png_examples

    record = tmp_path / "record.bin"
    record.write_bytes(png_examples(sample_images["image"][:1], sample_images["label"][:1],
                                    sample_images["bbox"][:1, None])[0])
    code = f"""
import pathlib
from transforms.cam_chunks import ChunkJob, DecodeRecords
from transforms.nengo_shim import tf
from transforms.preprocess import Preprocessing
from transforms.records import Example, ExampleDecoder
from transforms.spiking import SpikingSettings
from transforms.statistics import StatisticsSettings
from transforms.store import StoreLayout

job = ChunkJob("model.h5", SpikingSettings(), ExampleDecoder(),
               StoreLayout(n_images=1, n_steps=2, dt=0.001, max_boxes=1, images_per_chunk=1),
               StatisticsSettings(size=(64, 64)), Preprocessing(), threads_per_worker=1)
decode = DecodeRecords(job, 10)
decode.setup()
decode.start_bundle()
((_, (_, example)),) = decode.process((0, (0, pathlib.Path({str(record)!r}).read_bytes())))
assert isinstance(example, Example) and example.image.shape == (64, 64, 1), example
print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "1"]


def test_worker_threads_reach_tensorflow_where_the_launcher_is_the_worker(tmp_path):
    """With the in-process runner, the launcher's own first TensorFlow op (loading the
    model) would fix the counts before any DoFn could set them: --worker-threads 1 was
    logged as not applied and TensorFlow ran with its default. They are set first."""
    code = f"""
import sys
from pipeline.cli import main
from transforms.nengo_shim import tf
code = main(["run", "--limit", "2", "--n-steps", "2", "--worker-threads", "1",
             "--output", {str(tmp_path / "t.zarr")!r}])
threads = tf.config.threading
print(code, threads.get_intra_op_parallelism_threads(), threads.get_inter_op_parallelism_threads())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["0", "1", "1"]
    assert "TensorFlow threads left at" not in result.stderr


def test_run_reports_stage_times_and_when_chunks_were_written(store_dir):
    from pipeline.cli import parser, request_from_args
    from pipeline.run import execute

    out = store_dir / "metrics.zarr"
    args = parser().parse_args(["run", "--neuron", "relu", "--n-steps", "2", "--limit", "12",
                                "--images-per-chunk", "4", "--output", str(out)])
    metrics = {}
    before = time.time() * 1000
    execute(request_from_args(args), [], metrics)
    assert metrics["images"] == 12
    # Measured in the background threads, counted through the DoFns' threads.
    assert metrics["statistics_ms"] > 0 and metrics["write_ms"] >= 0 and "engine_ms" in metrics
    assert before <= metrics["chunk_written_at_ms_min"] <= metrics["chunk_written_at_ms_max"] <= time.time() * 1000


def test_nengo_dl_engine_gives_the_fast_engines_store(store_dir, relu_store):
    """The reference engine through the whole pipeline gives what the fast engine gave."""
    out = store_dir / "relu_nengo_dl.zarr"
    assert run_cli("--engine", "nengo-dl", "--neuron", "relu", "--n-steps", "4", *SMALL_RUN,
                   "--output", str(out)) == 0
    fast, nengo = xr.open_zarr(relu_store), xr.open_zarr(out)
    assert (fast.attrs["engine"], nengo.attrs["engine"]) == ("fast", "nengo-dl")
    scale = float(np.abs(fast.cam).max())
    np.testing.assert_allclose(nengo.cam.values, fast.cam.values, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(nengo.logits.values, fast.logits.values, rtol=1e-5, atol=1e-5 * scale)
    # Boxes threshold the maps: a pixel within rounding of the threshold may move one edge.
    assert np.mean(nengo.cam_box.values == fast.cam_box.values) > 0.99


def test_a_keras3_model_file_runs_end_to_end(tmp_path, sample_images):
    """A model saved by Keras 3 runs through the whole pipeline (its workers load it too):
    with rate neurons, the stored logits at every step are the Keras 3 model's own
    pre-softmax logits, computed here with Keras 3."""
    import keras

    from tests.test_model_head import keras3_cnn

    original = keras3_cnn()
    model_path, out = tmp_path / "keras3.keras", tmp_path / "keras3.zarr"
    original.save(model_path)
    assert run_cli("--model", str(model_path), "--neuron", "relu", "--n-steps", "2", *SMALL_RUN,
                   "--output", str(out)) == 0
    ds = xr.open_zarr(out)
    images = sample_images["image"].astype(np.float32) / 255.0
    features = np.asarray(keras.Model(original.input, original.get_layer("features").output)(images))
    weights, bias = original.get_layer("classes").get_weights()
    logits = features.mean(axis=(1, 2)) @ weights + bias
    assert ds.attrs["engine"] == "fast"
    np.testing.assert_allclose(ds.logits_reference.values, logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds.logits.values[:, -1], logits, rtol=1e-4, atol=1e-5)


def test_a_residual_model_with_max_pooling_runs_on_the_fast_engine_as_on_nengo_dl(tmp_path):
    """A ResNet-style model (max pooling, a residual block with batch normalization) runs
    through the whole pipeline on the fast engine, and its spiking store is the nengo-dl
    engine's: the same CAMs and logits at every step."""
    from transforms.nengo_shim import tf_keras

    layers = tf_keras.layers
    x = inputs = tf_keras.Input((64, 64, 1))
    x = layers.MaxPooling2D(2)(layers.Conv2D(8, 3, padding="same", activation="relu")(x))
    y = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    x = layers.ReLU()(layers.Add()([x, layers.Conv2D(8, 3, padding="same")(y)]))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="features")(x)
    model = tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(layers.GlobalAveragePooling2D()(x)))
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.3, w.shape) if w.ndim > 1 else np.abs(rng.normal(0.1, 0.05, w.shape))
                       for w in model.get_weights()])
    model_path = tmp_path / "residual.h5"
    model.save(model_path)
    stores = {}
    for engine in ("fast", "nengo-dl"):
        stores[engine] = tmp_path / f"{engine}.zarr"
        assert run_cli("--model", str(model_path), "--engine", engine, "--n-steps", "8", *SMALL_RUN,
                       "--output", str(stores[engine])) == 0
    fast, nengo = xr.open_zarr(stores["fast"]), xr.open_zarr(stores["nengo-dl"])
    assert (fast.attrs["engine"], nengo.attrs["engine"]) == ("fast", "nengo-dl")
    assert (fast.status.values == 1).all() and np.abs(fast.cam.values[:, :, -1]).max() > 0
    scale = float(np.abs(nengo.logits).max())
    np.testing.assert_allclose(fast.cam.values, nengo.cam.values, rtol=1e-5, atol=1e-5 * float(np.abs(nengo.cam).max()))
    np.testing.assert_allclose(fast.logits.values, nengo.logits.values, rtol=1e-5, atol=1e-5 * scale)
