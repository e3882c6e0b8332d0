"""The spiking network: a Keras CAM model converted with NengoDL and simulated over time.

Where the synapses sit (NengoDL's Converter): every connection out of a neuron population
carries the ``synapse`` lowpass filter (each adds a one-step delay), GAP and Dense are
linear transforms, and the output probe reads the Dense output unfiltered. The feature
probe sits on the last convolutional layer's neurons with ``probe_synapse``. When
``probe_synapse == synapse`` (the default) the probed maps are exactly what the GAP reads,
so the spatial mean of ``cam`` plus the Dense bias equals ``logits`` at every step.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from transforms.buffers import check_features
from transforms.model_head import CamHead, cam_model
from transforms.nengo_shim import nengo, nengo_dl, tf, tf_keras

log = logging.getLogger(__name__)

NEURON_TYPES = {
    "spiking-relu": nengo.SpikingRectifiedLinear,
    "relu": nengo.RectifiedLinear,
    "lif": nengo.LIF,
}
ENGINES = ("fast", "nengo-dl")


@dataclass(frozen=True)
class SpikingSettings:
    """How the converted network is simulated.

    neuron: a key of NEURON_TYPES, swapped in for every ReLU; n_steps: timesteps per image;
    dt: step length (s); synapse: lowpass time constant (s) on every connection out of a
    neuron population, None for none; probe_synapse: lowpass (s) on the probed feature
    maps, None for none; scale_firing_rates: input gain, with output amplitude divided by
    the same (higher: more spikes, closer to the rate network); batch_size: simulator
    minibatch size (images); engine: "fast" (``transforms.fast_engine``, layer by layer)
    or "nengo-dl" (``nengo_dl.Simulator``, the reference).
    """

    neuron: str = "spiking-relu"
    n_steps: int = 30
    dt: float = 0.001
    synapse: float | None = 0.005
    probe_synapse: float | None = 0.005
    scale_firing_rates: float = 100.0
    batch_size: int = 16
    engine: str = "fast"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {ENGINES}")
        if self.neuron not in NEURON_TYPES:
            raise ValueError(f"unknown neuron type {self.neuron!r}; choose from {sorted(NEURON_TYPES)}")
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be at least 1, got {self.n_steps}")
        if self.dt <= 0:
            raise ValueError(f"dt must be positive, got {self.dt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.scale_firing_rates <= 0:
            raise ValueError(f"scale_firing_rates must be positive, got {self.scale_firing_rates}")


def _lowpass(tau: float | None):
    return None if tau is None or tau == 0 else nengo.Lowpass(tau)


class ReferenceNetwork:
    """The non-spiking Keras model's feature maps and logits (one forward pass)."""

    def __init__(self, model: tf_keras.Model, head: CamHead):
        submodel = cam_model(model, head)
        spec = tf.TensorSpec((None,) + tuple(submodel.input_shape[1:]), tf.float32)
        # One graph function for any batch size (Keras's predict_on_batch costs ~7 ms more
        # per call on its own machinery).
        self._forward = tf.function(lambda x: submodel(x, training=False), input_signature=[spec])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images: (N, H, W, C) float32 -> features (N, h, w, c), logits (N, K)."""
        features, logits = self._forward(tf.convert_to_tensor(images, tf.float32))
        return features.numpy(), logits.numpy()


@dataclass(frozen=True)
class ConvertedNetwork:
    """A Keras CAM model converted to a nengo network, with the probes the pipeline reads.

    neuron_layers: names of the Keras layers that became neuron populations, in order;
    rate_probes: one per neuron layer, its mean firing rate (Hz) at each step.
    """

    net: nengo.Network
    input: nengo.Node
    logits_probe: nengo.Probe
    feature_probe: nengo.Probe
    neuron_layers: tuple[str, ...]
    rate_probes: tuple[nengo.Probe, ...]


def convert(model: tf_keras.Model, head: CamHead, settings: SpikingSettings) -> ConvertedNetwork:
    """Convert the model's input -> logits path with NengoDL and add the pipeline's probes.

    Every ReLU becomes ``settings.neuron``; the network's seed is fixed (nengo draws initial
    neuron states, e.g. spiking-ReLU voltages uniform in [0, 1), from the global RNG when
    the network has none, so every worker would start its neurons differently).
    """
    submodel = cam_model(model, head)
    logits_model = tf_keras.Model(submodel.inputs[0], submodel.outputs[1])
    neuron = NEURON_TYPES[settings.neuron]()
    with warnings.catch_warnings():
        # Both spellings of ReLU are swapped; a model uses one of them.
        warnings.filterwarnings("ignore", "swap_activations contained")
        converter = nengo_dl.Converter(
            logits_model,
            swap_activations={tf_keras.activations.relu: neuron, tf.nn.relu: neuron},
            scale_firing_rates=settings.scale_firing_rates,
            synapse=_lowpass(settings.synapse),
            inference_only=True,
        )
    converter.net.seed = 0
    feature_object = converter.layers[logits_model.get_layer(head.feature_layer)]
    with converter.net:
        feature_probe = nengo.Probe(
            feature_object, synapse=_lowpass(settings.probe_synapse), label="features"
        )
        neuron_layers, rate_probes = _probe_firing_rates(converter, logits_model)
    return ConvertedNetwork(
        converter.net,
        converter.inputs[logits_model.inputs[0]],
        converter.outputs[logits_model.outputs[0]],
        feature_probe,
        neuron_layers,
        rate_probes,
    )


def _probe_firing_rates(converter, model: tf_keras.Model) -> tuple[tuple[str, ...], tuple]:
    """Probe each neuron layer's mean firing rate (Hz) at every step.

    A neuron's output is ``amplitude * rate`` (spikes: ``amplitude * n_spikes / dt``), so
    one summing connection with weights ``1 / (n * amplitude)`` gives the layer's mean
    rate in spikes per second per neuron, without probing every neuron.
    """
    names, probes, seen = [], [], set()
    for layer in model.layers:
        neurons = converter.layers[layer]
        # Flatten/Reshape are no-ops that hand on the object of the layer before them.
        if not isinstance(neurons, nengo.ensemble.Neurons) or id(neurons) in seen:
            continue
        seen.add(id(neurons))
        # Neuron types without an amplitude (e.g. nengo.Sigmoid for a sigmoid layer) output their rate.
        n, amplitude = neurons.size_out, getattr(neurons.ensemble.neuron_type, "amplitude", 1.0)
        mean_rate = nengo.Node(size_in=1, label=f"rate_{layer.name}")
        nengo.Connection(
            neurons, mean_rate, transform=np.full((1, n), 1.0 / (n * amplitude)), synapse=None
        )
        names.append(layer.name)
        probes.append(nengo.Probe(mean_rate, synapse=None))
    return tuple(names), tuple(probes)


class SpikingNetwork:
    """A NengoDL simulator of the converted model, built once and reused for every batch."""

    def __init__(self, model: tf_keras.Model, head: CamHead, settings: SpikingSettings):
        self.head = head
        self.settings = settings
        if settings.neuron == "lif":
            log.warning(
                "LIF neurons do not follow the ReLU rate curve the model was trained with: "
                "expect CAMs and accuracy far from the Keras model's unless it was trained "
                "for LIF (e.g. with nengo_dl.LIF)"
            )
        self.network = convert(model, head, settings)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "No GPU support detected")
            self._sim = nengo_dl.Simulator(
                self.network.net,
                dt=settings.dt,
                minibatch_size=settings.batch_size,
                progress_bar=False,
                seed=0,
            )

    def close(self) -> None:
        self._sim.close()

    def run(self, images: np.ndarray, features: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Simulate ``n_steps`` per image, in minibatches (the last one zero-padded).

        images: (N, H, W, C) float32, held constant over time; features: where to write the
        features (N, T, h, w, c) float32, C-contiguous, or None for a new array.
        Returns features (N, T, h, w, c) from the feature probe, logits (N, T, K), and the
        mean firing rate (Hz) of each of ``neuron_layers`` at each step (N, T, L).
        """
        batch, steps = self.settings.batch_size, self.settings.n_steps
        n = len(images)
        features = check_features(features, (n, steps) + self.head.feature_shape)
        logits = np.empty((n, steps, self.head.n_classes), np.float32)
        network = self.network
        rates = np.empty((n, steps, len(network.rate_probes)), np.float32)
        flat = images.reshape(n, 1, -1).astype(np.float32)
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            x = np.zeros((batch, steps, flat.shape[-1]), np.float32)
            x[: stop - start] = flat[start:stop]
            out = self._sim.predict_on_batch({network.input: x})
            features[start:stop] = out[network.feature_probe][: stop - start].reshape(
                (stop - start, steps) + self.head.feature_shape
            )
            logits[start:stop] = out[network.logits_probe][: stop - start]
            for i, probe in enumerate(network.rate_probes):
                rates[start:stop, :, i] = out[probe][: stop - start, :, 0]
        return features, logits, rates
