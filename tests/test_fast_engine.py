"""The fast engine reproduces nengo_dl.Simulator on the same converted network.

Rate neurons: to 1e-5 relative at every step. Spiking neurons: the same spike counts for
all but 0.1% of neurons (float ties), and CAMs correlating >= 0.999 at every step.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.sample import SAMPLE_MODEL
from tests.map_helpers import pearson
from transforms.cam import class_activation_maps
from transforms.fast_engine import (
    DENSE_ABOVE,
    FastSpikingNetwork,
    bytes_per_image,
    effective_settings,
    plan,
    projections,
)
from transforms.model_head import find_cam_head, load_keras_model
from transforms.nengo_shim import tf_keras
from transforms.spiking import (
    ReferenceNetwork,
    SpikingNetwork,
    SpikingSettings,
    convert,
)

L = tf_keras.layers


def _scaled(model: tf_keras.Model, seed: int) -> tf_keras.Model:
    """Random weights scaled so that units are active but not saturated."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            fan_in = np.prod(weights[0].shape[:-1])
            new = [rng.normal(0, 1.5 / np.sqrt(fan_in), w.shape).astype(np.float32) for w in weights[:1]]
            new += [rng.uniform(-0.1, 0.3, w.shape).astype(np.float32) for w in weights[1:]]
            layer.set_weights(new)
    return model


def conv_pool_net() -> tf_keras.Model:
    x = inputs = tf_keras.Input((12, 12, 2))
    x = L.Conv2D(4, 3, activation="relu")(x)
    x = L.AveragePooling2D(2)(x)
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="features")(x)
    return _scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 1)


def dense_reshape_net() -> tf_keras.Model:
    x = inputs = tf_keras.Input((8, 8, 1))
    x = L.Flatten()(x)
    x = L.Dense(32, activation="relu")(x)
    x = L.Reshape((4, 4, 2))(x)
    x = L.Conv2D(5, 3, padding="same")(x)  # linear, with bias
    x = L.ReLU(name="features")(x)
    return _scaled(tf_keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling2D()(x))), 2)


def strided_net() -> tf_keras.Model:
    x = inputs = tf_keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, strides=2, use_bias=False)(x)
    x = L.Activation("relu")(x)
    x = L.Dropout(0.3)(x)
    x = L.Conv2D(8, 3, activation="relu", name="features")(x)
    return _scaled(tf_keras.Model(inputs, L.Dense(5)(L.GlobalAveragePooling2D()(x))), 3)


def projected_net() -> tf_keras.Model:
    """Every neuron layer feeds the next one's Conv2D or Dense directly: spikes run through
    them event by event (odd sizes, so 'same' pads one side more; Dense after Flatten)."""
    x = inputs = tf_keras.Input((11, 9, 2))
    x = L.Conv2D(6, (5, 3), strides=(2, 1), padding="same", activation="relu")(x)
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Dense(24, activation="relu")(L.Flatten()(x))
    x = L.Conv2D(5, 2, padding="same", activation="relu", name="features")(L.Reshape((2, 3, 4))(x))
    return _scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 4)


def chained_net() -> tf_keras.Model:
    """Shapes and chains the others lack: 1x1 and (3, 2) kernels, strides (1, 2), pooling whose
    stride is not its size, a linear Conv2D straight into another, and two neuron
    populations in a row (a Conv2D's ReLU, then a ReLU layer)."""
    x = inputs = tf_keras.Input((16, 14, 3))
    x = L.Conv2D(5, 1, activation="relu")(x)
    x = L.AveragePooling2D(3, strides=2)(x)
    x = L.Conv2D(6, 3, use_bias=False)(x)
    x = L.Conv2D(7, (3, 2), strides=(1, 2), padding="same", activation="relu")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 2, padding="same")(x)
    x = L.Activation("relu", name="features")(x)
    return _scaled(tf_keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling2D()(x))), 5)


def batchnorm_net() -> tf_keras.Model:
    """Batch normalization where trained CNNs have it (a linear Conv2D's output, before its
    ReLU), on a spiking population's output (its offset after the synapse), on a Dense's
    output, and without scale or centre; moving statistics set to values training leaves."""
    x = inputs = tf_keras.Input((12, 10, 2))
    x = L.Conv2D(6, 3, use_bias=False)(x)
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.BatchNormalization(center=False)(x)
    x = L.Conv2D(6, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Dense(32, activation="relu")(L.BatchNormalization(scale=False)(L.Flatten()(x)))
    x = L.Conv2D(6, 2, padding="same", name="features")(L.Reshape((4, 4, 2))(x))
    x = L.Activation("relu")(L.BatchNormalization(epsilon=0.01)(x))
    return _trained_batch_normalization(_scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 7), 7)


def _trained_batch_normalization(model: tf_keras.Model, seed: int) -> tf_keras.Model:
    """Batch normalization layers given moving statistics, scales and offsets such as
    training leaves (positive variances)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.uniform(-0.2, 0.2, size))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, size))
            for weight, low, high in ((layer.gamma, 0.5, 1.5), (layer.beta, 0.0, 0.4)):
                if weight is not None:
                    weight.assign(rng.uniform(low, high, size))
    return model


def random_net(seed: int) -> tf_keras.Model:
    """A random network of the supported layers, as a user's network might be: 1-3 blocks of
    Conv2D (kernels 1-3 by 1-3, strides 1-2, either padding, with or without bias, ReLU as
    its activation or as a layer, optional zero padding before and batch normalization
    after), average or max pooling (either padding), Dense between Flatten and Reshape,
    Dropout, or a residual block (two Conv2Ds added to their input, then a ReLU); then
    the feature Conv2D, GAP and Dense."""
    rng = np.random.default_rng(seed)
    x = inputs = tf_keras.Input((int(rng.integers(8, 21)), int(rng.integers(8, 21)), int(rng.integers(1, 4))))
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["conv", "conv", "pool", "dense", "dropout", "residual"])
        if kind == "residual":
            y = L.Conv2D(int(rng.integers(2, 9)), int(rng.integers(1, 4)), padding="same", activation="relu")(x)
            y = L.Conv2D(x.shape[-1], int(rng.integers(1, 4)), padding="same", use_bias=bool(rng.integers(2)))(y)
            x = L.ReLU()(L.Add()([x, y]))
        elif kind == "pool" and min(x.shape[1:3]) >= 6:
            size, pool = int(rng.integers(2, 4)), [L.AveragePooling2D, L.MaxPooling2D][rng.integers(2)]
            x = pool(size, strides=int(rng.integers(1, size + 1)), padding=rng.choice(["valid", "same"]))(x)
        elif kind == "dense" and np.prod(x.shape[1:]) <= 400:
            shape = (int(rng.integers(2, 5)), int(rng.integers(2, 5)), int(rng.integers(1, 4)))
            x = L.Reshape(shape)(L.Dense(int(np.prod(shape)), activation="relu")(L.Flatten()(x)))
        elif kind == "dropout":
            x = L.Dropout(0.2)(x)
        else:
            if rng.integers(3) == 0:
                x = L.ZeroPadding2D(tuple(tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(2)))(x)
            kernel = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
            fits = all(n - k >= 2 for n, k in zip(x.shape[1:3], kernel))
            relu_inside = bool(rng.integers(2))
            x = L.Conv2D(int(rng.integers(2, 9)), kernel, strides=(int(rng.integers(1, 3)), int(rng.integers(1, 3))),
                         padding=rng.choice(["valid", "same"]) if fits else "same", use_bias=bool(rng.integers(2)),
                         activation="relu" if relu_inside else None)(x)
            if not relu_inside:
                if rng.integers(2):
                    x = L.BatchNormalization(center=bool(rng.integers(2)), scale=bool(rng.integers(2)))(x)
                x = L.ReLU()(x) if rng.integers(2) else L.Activation("relu")(x)
    x = L.Conv2D(int(rng.integers(3, 9)), int(rng.integers(1, 4)), padding="same", activation="relu",
                 name="features")(x)
    model = tf_keras.Model(inputs, L.Dense(int(rng.integers(2, 6)))(L.GlobalAveragePooling2D()(x)))
    return _trained_batch_normalization(_scaled(model, seed), seed)


def padded_net() -> tf_keras.Model:
    """Zero padding on the input, and uneven padding on a spiking population's output."""
    x = inputs = tf_keras.Input((9, 10, 2))
    x = L.Conv2D(5, 3, activation="relu")(L.ZeroPadding2D(1)(x))
    x = L.Conv2D(6, 3, strides=2, activation="relu", name="features")(L.ZeroPadding2D(((1, 2), (0, 1)))(x))
    return _scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 8)


def max_pool_net() -> tf_keras.Model:
    """Pooling that NengoDL's converter runs in a TensorNode, whose input has no synapse: max
    pooling ('same') on the input, and ('valid') on a spiking population's raw output;
    'same' average pooling after a ReLU layer."""
    x = inputs = tf_keras.Input((14, 13, 2))
    x = L.Conv2D(6, 3, activation="relu")(L.MaxPooling2D(2, padding="same")(x))
    x = L.ReLU()(L.Conv2D(6, 3, padding="same")(L.MaxPooling2D(2)(x)))
    x = L.AveragePooling2D(3, strides=1, padding="same")(x)
    x = L.Conv2D(5, 2, padding="same", activation="relu", name="features")(x)
    return _scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 9)


def pooled_features_net() -> tf_keras.Model:
    """Max pooling as the CAM feature layer, as in VGG (block5_pool before the GAP)."""
    x = inputs = tf_keras.Input((12, 12, 2))
    x = L.Conv2D(6, 3, activation="relu")(L.Conv2D(6, 3, activation="relu")(x))
    x = L.MaxPooling2D(2, name="features")(x)
    return _scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 10)


def residual_net() -> tf_keras.Model:
    """ResNet's shapes: a stem with max pooling, a block whose shortcut is a population's
    output (synapse-filtered) and whose other branch has batch normalization, a strided
    block with 1x1 convolutions on both branches (one fed by a population whose spikes
    go event by event), and a concatenation."""
    x = inputs = tf_keras.Input((14, 12, 2))
    x = L.MaxPooling2D(3, strides=2, padding="same")(L.Conv2D(6, 3, padding="same", activation="relu")(x))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same", use_bias=False)(x)))
    x = L.ReLU()(L.Add()([x, L.Conv2D(6, 3, padding="same")(y)]))
    y = L.Conv2D(8, 3, padding="same", activation="relu")(L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x))
    x = L.Activation("relu")(L.Add()([L.Conv2D(8, 1, strides=2)(x), L.Conv2D(8, 1)(y)]))
    x = L.Concatenate()([x, L.Conv2D(4, 1, activation="relu")(x)])
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="features")(x)
    model = tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    return _trained_batch_normalization(_scaled(model, 11), 11)


def constant_branch_net() -> tf_keras.Model:
    """Branches on the constant input joining branches over time: a linear 1x1 Conv2D of
    the input added to a population's, and the input itself concatenated with another."""
    x = inputs = tf_keras.Input((10, 10, 2))
    y = L.Conv2D(5, 3, padding="same")(L.Conv2D(5, 3, padding="same", activation="relu")(x))
    x = L.ReLU()(L.Add()([L.Conv2D(5, 1)(x), y]))
    x = L.Concatenate()([L.AveragePooling2D(1)(inputs), x])
    x = L.Conv2D(6, 3, activation="relu", name="features")(x)
    return _scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 12)


def pixel_dense_net() -> tf_keras.Model:
    """Dense layers on feature maps (per pixel: 1x1 convolutions, which the converter is
    handed as Conv2Ds), one after a linear Conv2D and one as the CAM feature layer."""
    x = inputs = tf_keras.Input((10, 9, 2))
    x = L.Dense(5, activation="relu")(L.Conv2D(6, 3, activation="relu")(x))
    x = L.Dense(4, activation="relu", name="features")(L.Conv2D(6, 3, strides=2, padding="same")(x))
    return _scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 13)


def rescaling_net() -> tf_keras.Model:
    """Rescaling and Normalization, which NengoDL's converter runs in TensorNodes: on the
    input (as models that take 0-255 pixels start), and on spiking populations' raw
    outputs (a per-channel Normalization, and its inverse)."""
    x = inputs = tf_keras.Input((10, 10, 2))
    x = L.Conv2D(6, 3, activation="relu")(L.Rescaling(1 / 2, offset=-0.25)(x))
    x = L.Normalization(mean=[0.1, 0.2, 0.0, 0.3, 0.1, 0.2], variance=[1.0, 0.5, 2.0, 0.25, 1.5, 0.8])(x)
    x = L.Conv2D(5, 3, padding="same", activation="relu")(L.Rescaling(0.5, offset=0.1)(x))
    x = L.Normalization(mean=0.2, variance=0.5, invert=True)(x)
    x = L.Conv2D(5, 3, padding="same", activation="relu", name="features")(L.Normalization(mean=0.1, variance=4.0)(x))
    return _scaled(tf_keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))), 14)


NETWORKS = {"conv_pool": conv_pool_net, "dense_reshape": dense_reshape_net, "strided": strided_net,
            "projected": projected_net, "chained": chained_net, "batchnorm": batchnorm_net, "padded": padded_net,
            "max_pool": max_pool_net, "pooled_features": pooled_features_net, "residual": residual_net,
            "constant_branch": constant_branch_net, "pixel_dense": pixel_dense_net, "rescaling": rescaling_net}


def test_residual_net_projects_only_where_one_layer_reads_a_population():
    model = residual_net()
    steps = plan(model, find_cam_head(model))
    assert [step.inputs for step in steps if step.kind == "add"] == [(1, 5), (10, 11)]
    assert sorted(projections(steps)) == [8]  # the strided block's first Conv2D into its second


def test_projected_net_runs_its_spikes_through_every_layer_event_by_event():
    model = projected_net()
    steps = plan(model, find_cam_head(model))
    neuron_steps = [i for i, step in enumerate(steps) if step.neurons]
    assert sorted(projections(steps)) == neuron_steps[:-1]


def _run_both(model, settings, images, dense_above=DENSE_ABOVE):
    head = find_cam_head(model)
    reference = SpikingNetwork(model, head, settings)
    try:
        expected = reference.run(images)
    finally:
        reference.close()
    return head, expected, FastSpikingNetwork(model, head, settings, dense_above=dense_above).run(images)


def _images(shape, n=6, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n,) + shape, dtype=np.float32)


def _assert_rate_neurons_match(model: tf_keras.Model, synapse: float | None) -> None:
    """Features, logits and rates to 1e-5 relative at every step."""
    settings = SpikingSettings(neuron="relu", n_steps=6, synapse=synapse, probe_synapse=0.01, batch_size=4)
    _, (features, logits, rates), (f, lg, r) = _run_both(model, settings, _images(model.input_shape[1:]))
    for expected, got in ((features, f), (logits, lg), (rates, r)):
        scale = np.abs(expected).max()
        assert scale > 0
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


def _assert_spiking_neurons_match(model: tf_keras.Model, neuron: str, synapse: float | None,
                                  dense_above: float) -> None:
    """The same spike counts for all but 0.1% of the feature layer's neurons, CAMs
    correlating >= 0.999 at every step where defined, and the last step's logits to 1e-3."""
    images = _images(model.input_shape[1:], n=8)
    # Spike counts: probe the feature layer unfiltered, so its output is spikes * amplitude / dt.
    raw = SpikingSettings(neuron=neuron, n_steps=25, synapse=synapse, probe_synapse=None,
                          scale_firing_rates=50, batch_size=8)
    _, (features, _, _), (f, _, _) = _run_both(model, raw, images, dense_above)
    to_counts = raw.dt * raw.scale_firing_rates
    counts, fast_counts = np.rint(features.sum(1) * to_counts), np.rint(f.sum(1) * to_counts)
    assert counts.sum() > 100, "the test network should spike"
    assert np.mean(counts != fast_counts) <= 0.001
    filtered = SpikingSettings(neuron=neuron, n_steps=25, synapse=synapse, probe_synapse=0.01,
                               scale_firing_rates=50, batch_size=8)
    head, (features, logits, _), (f, lg, _) = _run_both(model, filtered, images, dense_above)
    cam, fast_cam = class_activation_maps(features, head.weights), class_activation_maps(f, head.weights)
    correlation = pearson(fast_cam, cam)  # (image, step, class)
    defined = ~np.isnan(pearson(cam, cam))
    assert defined[:, -5:].all()
    assert np.nanmin(np.where(defined, correlation, np.nan)) >= 0.999
    np.testing.assert_allclose(lg[:, -1], logits[:, -1], rtol=1e-3, atol=1e-3 * np.abs(logits).max())


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("synapse", [None, 0.005])
def test_rate_neurons_match_to_1e5_at_every_step(network, synapse):
    _assert_rate_neurons_match(NETWORKS[network](), synapse)


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("neuron", ["spiking-relu", "lif"])
@pytest.mark.parametrize("synapse", [None, 0.005])
@pytest.mark.parametrize("dense_above", [np.inf, 0.0], ids=["event", "dense"])
def test_spiking_neurons_match_spike_counts_and_cams(network, neuron, synapse, dense_above):
    """Spikes through the next layer event by event (dense_above = inf), or through
    TensorFlow's dense op (0: every image with a spike)."""
    _assert_spiking_neurons_match(NETWORKS[network](), neuron, synapse, dense_above)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_random_networks_of_supported_layers_match(seed):
    """Networks drawn at random from the supported layers, each neuron type in turn, with
    or without a synapse, spikes sent as the engine chooses or always one way."""
    model = random_net(seed)
    plan(model, find_cam_head(model))  # supported: the engine, not a fallback, runs it
    neuron, synapse = ["relu", "spiking-relu", "lif"][seed % 3], [None, 0.005][seed // 3 % 2]
    if neuron == "relu":
        _assert_rate_neurons_match(model, synapse)
    else:
        _assert_spiking_neurons_match(model, neuron, synapse, [DENSE_ABOVE, np.inf, 0.0][seed // 3 % 3])


def test_images_take_either_path_by_their_own_spikes_alone():
    """In one batch, quiet images go event by event and busy ones through the dense op
    (above 1% of their outputs nonzero here), and each image's outputs are those it gets
    alone in its batch."""
    model = projected_net()
    head = find_cam_head(model)
    settings = SpikingSettings(n_steps=12, scale_firing_rates=50, batch_size=4)
    contrast = np.array([0.02, 1.0, 0.05, 2.0], np.float32)[:, None, None, None]
    images = _images(model.input_shape[1:], n=4) * contrast
    engine = FastSpikingNetwork(model, head, settings, concurrent_batches=1, dense_above=0.01)
    taken = []
    run = engine._dense_projection
    engine._dense_projection = lambda index, *args: (taken.append(index), run(index, *args))[1]
    together = engine.run(images)
    assert taken and len(taken) < 4 * len(projections(engine.steps)), "both paths should be taken"
    for i in range(4):
        for got, alone in zip(together, engine.run(images[i : i + 1])):
            np.testing.assert_array_equal(got[i], alone[0])


def test_features_written_into_a_reused_array_are_those_of_a_fresh_run():
    """run(images, features=buffer) fills the buffer whole, padded last batch included:
    stale values from an earlier run (here NaN) never leak, and the nengo-dl engine fills
    it as well, with the same rates to 1e-5."""
    model = conv_pool_net()
    head = find_cam_head(model)
    settings = SpikingSettings(n_steps=8, scale_firing_rates=50, batch_size=4)
    engine = FastSpikingNetwork(model, head, settings)
    first, second = _images(model.input_shape[1:], n=11), _images(model.input_shape[1:], n=11, seed=1)
    buffer = np.full((11, settings.n_steps) + head.feature_shape, np.nan, np.float32)
    for images in (first, second):  # the second run reuses the first's buffers, padded ones included
        fresh = FastSpikingNetwork(model, head, settings).run(images)
        got = engine.run(images, buffer)
        assert got[0] is buffer and fresh[0].any()
        for a, b in zip(got, fresh):
            np.testing.assert_array_equal(a, b)
    rate = SpikingSettings(neuron="relu", n_steps=4, synapse=None, probe_synapse=None, batch_size=4)
    reference = SpikingNetwork(model, head, rate)
    try:
        buffer = np.full((7, rate.n_steps) + head.feature_shape, np.nan, np.float32)
        got = reference.run(first[:7], buffer)[0]
    finally:
        reference.close()
    expected = FastSpikingNetwork(model, head, rate).run(first[:7])[0]
    assert got is buffer
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_shipped_model_matches_nengo_dl(sample_images):
    model = load_keras_model(SAMPLE_MODEL)
    images = sample_images["image"][:8].astype(np.float32) / 255.0
    rate = SpikingSettings(neuron="relu", n_steps=3, synapse=None, probe_synapse=None, batch_size=8)
    _, (features, logits, _), (f, lg, _) = _run_both(model, rate, images)
    np.testing.assert_allclose(f, features, rtol=1e-5, atol=1e-5 * np.abs(features).max())
    np.testing.assert_allclose(lg, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    spiking = SpikingSettings(n_steps=20, probe_synapse=None, batch_size=8)
    _, (features, _, _), (f, _, _) = _run_both(model, spiking, images)
    counts = np.rint(features.sum(1) * spiking.dt * spiking.scale_firing_rates)
    fast_counts = np.rint(f.sum(1) * spiking.dt * spiking.scale_firing_rates)
    assert counts.sum() > 1000 and np.mean(counts != fast_counts) <= 0.001


def test_unsupported_network_falls_back_to_nengo_dl_with_a_reason(caplog):
    x = inputs = tf_keras.Input((8, 8, 1))
    x = L.LeakyReLU(0.1)(L.Conv2D(4, 3)(x))
    x = L.Conv2D(4, 3, activation="relu", padding="same")(x)
    model = tf_keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    head = find_cam_head(model)
    with pytest.raises(ValueError, match="LeakyReLU"):
        plan(model, head)
    settings = SpikingSettings(engine="fast")
    layers = convert(model, head, settings).neuron_layers
    with caplog.at_level(logging.WARNING):
        chosen = effective_settings(model, head, settings, layers)
    assert chosen.engine == "nengo-dl"
    assert "does not support this network" in caplog.text and "LeakyReLU" in caplog.text


def test_a_network_too_large_for_the_memory_budget_runs_smaller_batches_or_falls_back(caplog):
    """The engine holds every layer's values over all steps: within a budget of 7 images'
    worth it runs batches of 3, two at once, with the same results as batches of 8; with
    less than one image's worth the run falls back to nengo-dl, saying why."""
    model = conv_pool_net()
    head = find_cam_head(model)
    settings = SpikingSettings(n_steps=12, scale_firing_rates=50, batch_size=8)
    per_image = bytes_per_image(plan(model, head), settings.n_steps)
    images = _images(model.input_shape[1:], n=11)
    bounded = FastSpikingNetwork(model, head, settings, memory_budget=7 * per_image)
    assert (bounded.batch_size, bounded.batches_at_once) == (3, 2)
    whole = FastSpikingNetwork(model, head, settings, memory_budget=16 * per_image)
    assert (whole.batch_size, whole.batches_at_once) == (8, 2)
    expected = whole.run(images)
    assert expected[0].any()
    for got, want in zip(bounded.run(images), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"need ~[0-9.]+ GB per image, more than the [0-9.]+ GB"):
        FastSpikingNetwork(model, head, settings, memory_budget=per_image - 1)
    layers = convert(model, head, settings).neuron_layers
    with caplog.at_level(logging.WARNING):
        chosen = effective_settings(model, head, settings, layers, memory_budget=per_image - 1)
    assert chosen.engine == "nengo-dl" and "GB per image" in caplog.text
    assert effective_settings(model, head, settings, layers, memory_budget=per_image).engine == "fast"


def test_sigmoid_layer_runs_on_nengo_dl_with_its_rate_probed():
    """The converter makes a sigmoid layer a nengo.Sigmoid population, which has no amplitude:
    the run falls back to nengo-dl, and (at gain 1, rate neurons) gives the Keras model's
    outputs, with the sigmoid's mean output as that layer's rate."""
    x = inputs = tf_keras.Input((8, 8, 1))
    x = L.Conv2D(3, 3, activation="sigmoid", name="squash")(x)
    x = L.Conv2D(4, 3, activation="relu", name="features")(x)
    model = _scaled(tf_keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x))), 6)
    head = find_cam_head(model)
    settings = SpikingSettings(neuron="relu", n_steps=3, synapse=None, probe_synapse=None, batch_size=2,
                               scale_firing_rates=1.0)
    layers = convert(model, head, settings).neuron_layers
    assert layers == ("squash", "features")
    assert effective_settings(model, head, settings, layers).engine == "nengo-dl"
    images = _images(model.input_shape[1:], n=2)
    network = SpikingNetwork(model, head, settings)
    try:
        features, logits, rates = network.run(images)
    finally:
        network.close()
    keras_features, keras_logits = ReferenceNetwork(model, head).run(images)
    np.testing.assert_allclose(features[:, -1], keras_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits[:, -1], keras_logits, rtol=1e-5, atol=1e-6)
    squashed = tf_keras.Model(model.input, model.get_layer("squash").output)(images).numpy()
    np.testing.assert_allclose(rates[:, -1, 0], squashed.mean(axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("neuron", ["spiking-relu", "lif"])
def test_initial_states_are_those_nengo_dls_builder_draws(neuron):
    """Drawn from the ensembles' seeds alone, they equal what building the whole network
    with nengo-dl's builder gives."""
    from transforms.fast_engine import _initial_states
    from transforms.nengo_shim import nengo_dl

    model = load_keras_model(SAMPLE_MODEL)
    settings = SpikingSettings(neuron=neuron)
    converted = convert(model, find_cam_head(model), settings)
    built = nengo_dl.builder.NengoModel(dt=settings.dt, builder=nengo_dl.builder.NengoBuilder(), fail_fast=False)
    built.build(converted.net)
    ensembles = {ens.label.rsplit(".", 1)[0]: ens for ens in converted.net.all_ensembles}
    drawn = _initial_states(converted, converted.neuron_layers)
    assert list(drawn) == list(converted.neuron_layers)
    for name, states in drawn.items():
        signals = built.sig[ensembles[name].neurons]
        expected = {k: np.asarray(v.initial_value, np.float32).ravel() for k, v in signals.items()
                    if k in ("voltage", "refractory_time")}
        assert set(states) == set(expected) and "voltage" in states
        for key, value in expected.items():
            np.testing.assert_array_equal(states[key], value)
