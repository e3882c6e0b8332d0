"""A layer-major engine for the feed-forward networks NengoDL's Converter makes.

``nengo_dl.Simulator`` advances the whole network one timestep at a time. In a
feed-forward network, a layer's input at step t depends only on the layer below at step
t (or t - 1 through a synapse) and its own state, so each layer can run for all timesteps
at once: one batched convolution over (timesteps x images), then an elementwise scan over
time for the neuron state and the synapse. The first layer's input is constant, so it is
convolved once. Everything runs in one TensorFlow graph; each scan is XLA-compiled.

It reproduces the converted network exactly as NengoDL builds it:

- each ReLU layer is a neuron population with gain = scale_firing_rates and amplitude
  divided by it; a Conv2D's bias enters through a bias node, J = scale * (W x + b), a
  Dense's is the population's own bias, J = scale * W x + scale * b;
- every connection out of a neuron population carries the lowpass synapse, which delays
  by one step: F(0) = 0, F(t) = a F(t-1) + (1 - a) s(t-1), a = exp(-dt / tau);
  a synapse of None passes s(t) on in the same step;
- neuron updates are nengo-dl's (spiking ReLU: v += relu(J) dt, n = floor(v), v -= n,
  out = n * amplitude / dt; LIF with its refractory period), starting from the initial
  states nengo's builder draws for the network's seed.

Supported: Conv2D (groups 1, channels_last), Dense, AveragePooling2D ('valid'), Flatten,
Reshape, ReLU and Activation('relu'), inference-time identities (Dropout, ...), with
linear or ReLU activations, in a single chain from the input to the CAM feature layer.
Anything else raises UnsupportedNetwork, and the pipeline falls back to nengo-dl.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from transforms.model_head import IDENTITY_AT_INFERENCE, CamHead, inbound_layer
from transforms.nengo_shim import nengo_dl, tf, tf_keras
from transforms.spiking import SpikingSettings, convert

log = logging.getLogger(__name__)
layers = tf_keras.layers
RELUS = (tf_keras.activations.relu, tf.nn.relu)
LINEAR = (tf_keras.activations.linear, None)


class UnsupportedNetwork(ValueError):
    """The fast engine cannot run this network (the message says why)."""


@dataclass(frozen=True)
class Step:
    """One layer of the chain: a linear op, then (optionally) neurons.

    kind: "conv", "dense", "avgpool", "flatten", "reshape" or "identity"; neurons: whether
    a neuron population (the layer's ReLU) follows; bias_in_population: Dense-style bias
    (J = scale W x + scale b) rather than Conv2D-style (J = scale (W x + b)).
    """

    name: str
    kind: str
    neurons: bool
    kernel: np.ndarray | None = None
    bias: np.ndarray | None = None
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    pool: tuple[int, int] = (1, 1)
    shape: tuple[int, ...] = ()
    bias_in_population: bool = False


def _activation(layer) -> bool:
    """True for a ReLU activation (neurons), False for linear; else unsupported."""
    activation = getattr(layer, "activation", None)
    if activation in RELUS:
        return True
    if activation in LINEAR:
        return False
    raise UnsupportedNetwork(f"layer {layer.name!r}: activation {getattr(activation, '__name__', activation)!r}")


def plan(model: tf_keras.Model, head: CamHead) -> list[Step]:
    """The chain of steps from the model's input to the CAM feature layer."""
    chain = []
    layer = model.get_layer(head.feature_layer)
    while not isinstance(layer, layers.InputLayer):
        chain.append(layer)
        try:
            layer = inbound_layer(layer)
        except ValueError as err:
            raise UnsupportedNetwork(f"the network is not a single chain: {err}") from err
    steps = []
    for layer in reversed(chain):
        if isinstance(layer, layers.Conv2D) and type(layer) is layers.Conv2D:
            if layer.groups != 1 or layer.dilation_rate != (1, 1) or layer.data_format != "channels_last":
                raise UnsupportedNetwork(f"layer {layer.name!r}: grouped, dilated or channels_first Conv2D")
            weights = layer.get_weights()
            steps.append(Step(layer.name, "conv", _activation(layer), weights[0],
                              weights[1] if layer.use_bias else None, tuple(layer.strides), layer.padding.upper()))
        elif isinstance(layer, layers.Dense):
            weights = layer.get_weights()
            steps.append(Step(layer.name, "dense", _activation(layer), weights[0],
                              weights[1] if layer.use_bias else None, bias_in_population=True))
        elif isinstance(layer, layers.AveragePooling2D):
            if layer.padding != "valid" or layer.data_format != "channels_last":
                raise UnsupportedNetwork(f"layer {layer.name!r}: only 'valid' channels_last average pooling")
            steps.append(Step(layer.name, "avgpool", False, pool=tuple(layer.pool_size),
                              strides=tuple(layer.strides)))
        elif isinstance(layer, layers.Flatten):
            steps.append(Step(layer.name, "flatten", False))
        elif isinstance(layer, layers.Reshape):
            steps.append(Step(layer.name, "reshape", False, shape=tuple(layer.target_shape)))
        elif isinstance(layer, layers.ReLU):
            if layer.max_value is not None or float(layer.negative_slope) or float(layer.threshold):
                raise UnsupportedNetwork(f"layer {layer.name!r}: ReLU with max_value, slope or threshold")
            steps.append(Step(layer.name, "identity", True))
        elif isinstance(layer, layers.Activation):
            steps.append(Step(layer.name, "identity", _activation(layer)))
        elif isinstance(layer, IDENTITY_AT_INFERENCE):
            steps.append(Step(layer.name, "identity", False))
        else:
            raise UnsupportedNetwork(f"layer {layer.name!r} ({type(layer).__name__}) is not supported")
    return steps


def checked_plan(model: tf_keras.Model, head: CamHead, neuron_layers: tuple[str, ...]) -> list[Step]:
    """``plan``, checked against the converter's neuron layers (``neuron_layers``), whose
    initial states and rate probes the engine reuses; UnsupportedNetwork if they differ."""
    steps = plan(model, head)
    planned = tuple(step.name for step in steps if step.neurons)
    if planned != neuron_layers:
        raise UnsupportedNetwork(f"neuron layers {planned} differ from the converter's {neuron_layers}")
    return steps


def effective_settings(
    model: tf_keras.Model, head: CamHead, settings: SpikingSettings, neuron_layers: tuple[str, ...]
) -> SpikingSettings:
    """``settings`` with the engine that will run: "fast" only where it supports the network
    (``neuron_layers``: the converter's), else "nengo-dl", saying why in the log."""
    if settings.engine != "fast":
        return settings
    try:
        checked_plan(model, head, neuron_layers)
    except UnsupportedNetwork as err:
        log.warning("engine 'fast' does not support this network (%s): using 'nengo-dl'", err)
        return dataclasses.replace(settings, engine="nengo-dl")
    return settings


def _initial_states(converted, neuron_layers: tuple[str, ...], dt: float) -> dict[str, dict[str, np.ndarray]]:
    """Initial neuron states of each neuron layer, as nengo-dl's builder draws them."""
    model = nengo_dl.builder.NengoModel(dt=dt, builder=nengo_dl.builder.NengoBuilder(), fail_fast=False)
    model.build(converted.net)
    ensembles = {ens.label.rsplit(".", 1)[0]: ens for ens in converted.net.all_ensembles}
    return {
        name: {k: np.asarray(v.initial_value, np.float32) for k, v in model.sig[ensembles[name].neurons].items()
               if k in ("voltage", "refractory_time")}
        for name in neuron_layers
    }


def _scan_emissions(step, sequence: tf.Tensor, initial):
    """Run ``step(carry, x) -> (carry, emitted)`` over ``sequence`` (time-major); return the
    emissions stacked over time (tf.scan keeps only one structure, so carry both)."""
    def body(carry_and_emitted, x):
        return step(carry_and_emitted[0], x)

    first = step(initial, sequence[0])[1]
    _, emitted = tf.scan(body, sequence, initializer=(initial, tf.nest.map_structure(tf.zeros_like, first)))
    return emitted


def _decay(tau: float | None, dt: float) -> float | None:
    """A lowpass synapse's decay per step, exp(-dt / tau); None for no synapse."""
    return None if tau is None or tau == 0 else math.exp(-dt / tau)


def _lowpass(signal: tf.Tensor, tau: float | None, dt: float) -> tf.Tensor:
    """NengoDL's lowpass synapse over time-major ``signal`` (T, ...): one step of delay."""
    decay = _decay(tau, dt)
    if decay is None:
        return signal
    a = tf.constant(decay, signal.dtype)
    b = tf.constant(1 - decay, signal.dtype)
    shifted = tf.concat([tf.zeros_like(signal[:1]), signal[:-1]], axis=0)
    return tf.scan(lambda y, x: a * y + b * x, shifted)


class FastSpikingNetwork:
    """The converted network run layer by layer over all timesteps (see module docstring).

    Same interface as ``transforms.spiking.SpikingNetwork``.
    """

    def __init__(self, model: tf_keras.Model, head: CamHead, settings: SpikingSettings, jit_compile: bool = True,
                 concurrent_batches: int = 2):
        """jit_compile: XLA-compile each layer's neuron scan (fused, ~2x faster); the
        convolutions run on TensorFlow's own kernels, faster than XLA's on CPU.
        concurrent_batches: minibatches simulated at once, from as many threads. XLA runs
        a scan on one core, so a second batch in flight keeps another core busy (measured
        on 2 cores: 74 -> 85 images/s)."""
        self.head = head
        self.settings = settings
        converted = convert(model, head, settings)
        self.neuron_layers = converted.neuron_layers
        self.steps = checked_plan(model, head, self.neuron_layers)
        self._states = _initial_states(converted, self.neuron_layers, settings.dt)
        self._neuron = settings.neuron
        self._scale = np.float32(settings.scale_firing_rates)
        self._jit_compile = jit_compile
        self._run = tf.function(self._simulate, autograph=False)
        self._pool = ThreadPoolExecutor(concurrent_batches) if concurrent_batches > 1 else None

    def close(self) -> None:
        """Stop the batch threads (same interface as SpikingNetwork)."""
        if self._pool is not None:
            self._pool.shutdown()

    def _update(self, J: tf.Tensor, state: tuple) -> tuple[tf.Tensor, tuple]:
        """One step of nengo-dl's neuron update: (output = spikes * amplitude / dt or rate *
        amplitude, new state)."""
        dt = tf.constant(self.settings.dt, tf.float32)
        amplitude = tf.constant(1.0 / self._scale, tf.float32)  # the converter's 1 / scale
        if self._neuron == "relu":
            return tf.nn.relu(J) * amplitude, state
        if self._neuron == "spiking-relu":
            voltage = state[0] + tf.nn.relu(J) * dt
            n_spikes = tf.floor(voltage)
            return n_spikes * (amplitude / dt), (voltage - n_spikes,)
        voltage, refractory = state
        one, zero = tf.constant(1.0, tf.float32), tf.constant(0.0, tf.float32)
        tau_rc, tau_ref = tf.constant(0.02, tf.float32), tf.constant(0.002, tf.float32)
        delta_t = tf.clip_by_value(dt - refractory, zero, dt)
        voltage = voltage + (voltage - J) * tf.math.expm1(-delta_t / tau_rc)
        spiked = voltage > one
        partial_ref = -tau_rc * tf.math.log1p((one - voltage) / (J - one))
        refractory = tf.where(spiked, tau_ref - partial_ref, refractory - dt)
        voltage = tf.where(spiked, tf.zeros_like(voltage), tf.maximum(voltage, zero))
        return tf.cast(spiked, tf.float32) * (amplitude / dt), (voltage, refractory)

    def _current(self, step: Step, y: tf.Tensor) -> tf.Tensor:
        """The population's input current J from its layer's linear output (bias not added)."""
        if step.bias is None:
            return self._scale * y
        if step.bias_in_population:
            return self._scale * y + self._scale * step.bias
        return self._scale * (y + step.bias)

    def _neurons(self, y: tf.Tensor, step: Step, constant: bool, taus: tuple) -> tuple:
        """``_neuron_scan`` as one XLA-compiled function (if ``jit_compile``)."""
        scan = tf.function(lambda y: self._neuron_scan(y, step, constant, taus),
                           jit_compile=self._jit_compile, autograph=False)
        outputs, rates = scan(y)
        return list(outputs), rates

    def _neuron_scan(self, y: tf.Tensor, step: Step, constant: bool, taus: tuple) -> tuple:
        """Run a population over all steps, with its synapses fused into the same scan.

        y: the layer's linear output, (B, ...) if ``constant`` (the same every step) else
        (T, B, ...); the input current is made from it step by step inside the scan (one
        pass over memory fewer than making it first).
        taus: lowpass time constants to apply to the output (None: unfiltered).
        Returns ((output filtered by each tau), time-major (T, B, ...)) and the mean rate
        (T, B) in Hz. Filters follow nengo's synapse timing: F(0) = 0,
        F(t) = a F(t-1) + (1 - a) s(t-1).
        """
        dt = self.settings.dt
        shape = tf.shape(y)[0 if constant else 1 :]
        state = ()  # rate ReLU neurons have none
        if self._neuron != "relu":
            names = ("voltage", "refractory_time") if self._neuron == "lif" else ("voltage",)
            neuron_shape = (1,) + tuple(y.shape[1 if constant else 2 :])
            state = tuple(tf.broadcast_to(tf.reshape(self._states[step.name][k], neuron_shape), shape) for k in names)
        decays = [_decay(tau, dt) for tau in taus]
        zeros = tf.zeros(shape, tf.float32)
        axes = tuple(range(1, len(y.shape) - (0 if constant else 1)))  # all but the batch
        current = self._current(step, y) if constant else None

        def advance(carry, J):
            # filtered: F(t) of each synapse, emitted now; the carry takes on F(t + 1).
            filtered, state = carry
            J = current if constant else self._current(step, J)
            output, state = self._update(J, state)
            emitted = tuple(output if a is None else f for f, a in zip(filtered, decays))
            filtered = tuple(f if a is None else a * f + (1 - a) * output for f, a in zip(filtered, decays))
            return (filtered, state), (emitted, tf.reduce_mean(output, axis=axes) * self._scale)

        sequence = tf.zeros((self.settings.n_steps,)) if constant else y
        return _scan_emissions(advance, sequence, (tuple(zeros for _ in taus), state))

    def _linear(self, step: Step, x: tf.Tensor) -> tf.Tensor:
        """The step's linear op on (N, ...) values, without bias."""
        if step.kind == "conv":
            return tf.nn.conv2d(x, step.kernel, strides=step.strides, padding=step.padding)
        if step.kind == "dense":
            return tf.tensordot(x, step.kernel, axes=1)
        if step.kind == "avgpool":
            return tf.nn.avg_pool2d(x, step.pool, step.strides, "VALID")
        if step.kind == "flatten":
            return tf.reshape(x, (tf.shape(x)[0], -1))
        if step.kind == "reshape":
            return tf.reshape(x, (tf.shape(x)[0],) + step.shape)
        return x

    def _simulate(self, images: tf.Tensor):
        s = self.settings
        steps = s.n_steps
        x, time_major = images, False  # (B, ...) until the first neurons, then (T, B, ...)
        rates, output = [], None
        last_neurons = max((i for i, step in enumerate(self.steps) if step.neurons), default=None)
        if last_neurons is None:
            raise UnsupportedNetwork("no neuron layer before the feature map")
        for index, step in enumerate(self.steps):
            if time_major:
                flat = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))
                y = self._linear(step, flat)
                y = tf.reshape(y, tf.concat([[steps, -1], tf.shape(y)[1:]], 0))
            else:
                y = self._linear(step, x)
            if step.neurons:
                # The feature layer also feeds the probe, through its own synapse.
                taus = (s.synapse, s.probe_synapse) if index == last_neurons else (s.synapse,)
                outputs, rate = self._neurons(y, step, not time_major, taus)
                time_major = True
                rates.append(rate)
                x = outputs[0]
                output = outputs[1] if index == last_neurons else None
            else:
                x = y if step.bias is None else y + step.bias
                if index > last_neurons:  # a linear feature layer after the last neurons
                    output = _lowpass(x, s.probe_synapse, s.dt)
        pooled = tf.reduce_mean(x, axis=(2, 3))  # GAP of what the Dense reads: (T, B, C)
        logits = tf.tensordot(pooled, self.head.weights, axes=1) + self.head.bias
        return (tf.transpose(output, (1, 0, 2, 3, 4)), tf.transpose(logits, (1, 0, 2)),
                tf.transpose(tf.stack(rates, axis=-1), (1, 0, 2)))

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Simulate ``n_steps`` per image in minibatches of ``batch_size`` (the last padded).

        images: (N, H, W, C) float32. Returns features (N, T, h, w, c), logits (N, T, K) and
        the mean firing rate (Hz) of each neuron layer at each step (N, T, L).
        """
        batch, n = self.settings.batch_size, len(images)

        def simulate(start: int) -> list[np.ndarray]:
            x = np.zeros((batch,) + images.shape[1:], np.float32)
            x[: min(batch, n - start)] = images[start : start + batch]
            return [o.numpy()[: n - start] for o in self._run(tf.constant(x))]

        starts = range(0, n, batch)
        outputs = list(self._pool.map(simulate, starts) if self._pool and len(starts) > 1 else map(simulate, starts))
        return tuple(np.concatenate(parts) for parts in zip(*outputs))

