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

from transforms.model_head import CamHead, cam_model
from transforms.nengo_shim import nengo, nengo_dl, tf, tf_keras

log = logging.getLogger(__name__)

NEURON_TYPES = {
    "spiking-relu": nengo.SpikingRectifiedLinear,
    "relu": nengo.RectifiedLinear,
    "lif": nengo.LIF,
}


@dataclass(frozen=True)
class SpikingSettings:
    """How the converted network is simulated.

    neuron: a key of NEURON_TYPES, swapped in for every ReLU; n_steps: timesteps per image;
    dt: step length (s); synapse: lowpass time constant (s) on every connection out of a
    neuron population, None for none; probe_synapse: lowpass (s) on the probed feature
    maps, None for none; scale_firing_rates: input gain, with output amplitude divided by
    the same (higher: more spikes, closer to the rate network); batch_size: simulator
    minibatch size (images).
    """

    neuron: str = "spiking-relu"
    n_steps: int = 30
    dt: float = 0.001
    synapse: float | None = 0.005
    probe_synapse: float | None = 0.005
    scale_firing_rates: float = 100.0
    batch_size: int = 16

    def __post_init__(self) -> None:
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
        self._model = cam_model(model, head)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images: (N, H, W, C) float32 -> features (N, h, w, c), logits (N, K)."""
        features, logits = self._model.predict_on_batch(images.astype(np.float32))
        return features, logits


class SpikingNetwork:
    """A NengoDL simulator of the model, built once and reused for every batch."""

    def __init__(self, model: tf_keras.Model, head: CamHead, settings: SpikingSettings):
        self.head = head
        self.settings = settings
        if settings.neuron == "lif":
            log.warning(
                "LIF neurons do not follow the ReLU rate curve the model was trained with: "
                "expect CAMs and accuracy far from the Keras model's unless it was trained "
                "for LIF (e.g. with nengo_dl.LIF)"
            )
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
        # Fixed seed: nengo draws initial neuron states (e.g. spiking-ReLU voltages, uniform
        # in [0, 1)) from the global RNG when the network has none, so every worker would
        # start its neurons differently.
        converter.net.seed = 0
        feature_object = converter.layers[logits_model.get_layer(head.feature_layer)]
        with converter.net:
            self._feature_probe = nengo.Probe(
                feature_object, synapse=_lowpass(settings.probe_synapse), label="features"
            )
        self._input = converter.inputs[logits_model.inputs[0]]
        self._logits_probe = converter.outputs[logits_model.outputs[0]]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "No GPU support detected")
            self._sim = nengo_dl.Simulator(
                converter.net,
                dt=settings.dt,
                minibatch_size=settings.batch_size,
                progress_bar=False,
                seed=0,
            )

    def close(self) -> None:
        self._sim.close()

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Simulate ``n_steps`` per image, in minibatches (the last one zero-padded).

        images: (N, H, W, C) float32, held constant over time.
        Returns features (N, T, h, w, c) from the feature probe and logits (N, T, K).
        """
        batch, steps = self.settings.batch_size, self.settings.n_steps
        n = len(images)
        features = np.empty((n, steps) + self.head.feature_shape, np.float32)
        logits = np.empty((n, steps, self.head.n_classes), np.float32)
        flat = images.reshape(n, 1, -1).astype(np.float32)
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            x = np.zeros((batch, steps, flat.shape[-1]), np.float32)
            x[: stop - start] = flat[start:stop]
            out = self._sim.predict_on_batch({self._input: x})
            features[start:stop] = out[self._feature_probe][: stop - start].reshape(
                (stop - start, steps) + self.head.feature_shape
            )
            logits[start:stop] = out[self._logits_probe][: stop - start]
        return features, logits
