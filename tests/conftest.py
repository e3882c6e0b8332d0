"""Shared fixtures: small pipeline runs on the shipped sample, and reference values computed
independently of the pipeline (Keras forward passes, tfds's own reader)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import transforms.nengo_shim  # noqa: F401  (before TensorFlow)
from pipeline.cli import main
from pipeline.sample import SAMPLE_DATASET, SAMPLE_MODEL

N_IMAGES = 24
# Small but real: 3 chunks of 8 images, each simulated in batches of 3, 3 and 2 (the last
# batch of every chunk is zero-padded to the simulator's minibatch size).
SMALL_RUN = ["--limit", str(N_IMAGES), "--images-per-chunk", "8", "--batch-size", "3"]


def run_cli(*args: str) -> int:
    return main(["run", *args])


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="session")
def relu_store(store_dir) -> Path:
    """Rate neurons, 4 steps: must reproduce Keras exactly at every step."""
    out = store_dir / "relu.zarr"
    assert run_cli("--neuron", "relu", "--n-steps", "4", *SMALL_RUN, "--output", str(out)) == 0
    return out


SPIKING_ARGS = ["--n-steps", "12", *SMALL_RUN]


@pytest.fixture(scope="session")
def spiking_store(store_dir) -> Path:
    """The default spiking neurons and synapses, 12 steps, one worker."""
    out = store_dir / "spiking.zarr"
    assert run_cli(*SPIKING_ARGS, "--output", str(out)) == 0
    return out


@pytest.fixture(scope="session")
def sample_images() -> dict[str, np.ndarray]:
    """The first N_IMAGES test images, labels and boxes, read with tfds (not the pipeline)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(SAMPLE_DATASET))
    ds = builder.as_dataset(split="test", shuffle_files=False).take(N_IMAGES)
    rows = list(tfds.as_numpy(ds))
    return {
        "image": np.stack([r["image"] for r in rows]),
        "label": np.array([r["label"] for r in rows]),
        "bbox": np.stack([r["objects"]["bbox"][0] for r in rows]),
    }


@pytest.fixture(scope="session")
def keras_reference(sample_images) -> dict[str, np.ndarray]:
    """CAMs and logits of the shipped Keras model, computed directly with Keras."""
    from transforms.nengo_shim import tf_keras

    model = tf_keras.models.load_model(str(SAMPLE_MODEL), compile=False)
    convs = [model.get_layer(f"conv{i}").output for i in range(1, 5)]
    features_model = tf_keras.Model(model.input, convs + [model.output])
    x = sample_images["image"].astype(np.float32) / 255.0
    *activations, logits = features_model.predict(x, verbose=0)
    weights, bias = model.get_layer("logits").get_weights()
    cams = np.einsum("nyxc,ck->nkyx", activations[-1].astype(np.float64), weights)
    return {
        "cam": cams,
        "logits": logits,
        "weights": weights,
        "bias": bias,
        "activation_means": np.stack([a.mean(axis=(1, 2, 3)) for a in activations], axis=1),
    }


@pytest.fixture(autouse=True, scope="session")
def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
