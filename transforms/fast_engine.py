"""A layer-major engine for the feed-forward networks NengoDL's Converter makes.

``nengo_dl.Simulator`` advances the whole network one timestep at a time. In a
feed-forward network, a layer's input at step t depends only on the layer below at step
t (or t - 1 through a synapse) and its own state, so each layer can run for all timesteps
at once: one batched convolution over (timesteps x images), then an elementwise scan over
time for the neuron state and the synapse. The first layer's input is constant, so it is
convolved once. The linear ops run on TensorFlow's kernels; the scans are compiled numba
kernels (``transforms.neuron_kernels``) that keep a block of neurons' state in cache for
all steps, ~4x faster than an XLA-compiled ``tf.scan``. Values are batch-major (B, T, ...)
and pass between the two in place (DLPack), in per-thread buffers reused across batches.

Spikes are sparse (the shipped model at 30 steps: 0.3%, 2% and 8% of its first three
layers' neurons spike at a step), so where a spiking population feeds the next layer's
Conv2D or Dense directly (``projections``), that linear op runs event by event inside the
population's scan instead: each spike adds its value times the kernel taps it reaches to
the next layer's input. The synapse commutes with the linear op, so it filters that input
in the next scan. For the shipped model this does ~1/20 of the dense convolutions'
multiply-adds and runs the engine ~2.5x faster; rate neurons keep the dense convolutions.
Where an image's spikes are dense (``DENSE_ABOVE``), events cost more than the dense op,
so that image's population stops recording them and runs again into a buffer that
TensorFlow's op reads. On a constant input (the first layer), spiking neurons that
cannot spike skip the scan.

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

- a layer the converter cannot build natively (max pooling, 'same' average pooling,
  Rescaling, Normalization) runs in a TensorNode (``nengo_dl.Layer``), whose input
  connection has no synapse: the population below it passes its raw output on, in the
  same step.

Supported: Conv2D (groups 1, channels_last), Dense, AveragePooling2D and MaxPooling2D
(channels_last), BatchNormalization (over the last axis, at inference: x * scale + offset
per channel, with the offset, like a Conv2D's bias, entering after the synapse),
Rescaling and Normalization (x * scale + offset, per channel, in a TensorNode as above),
ZeroPadding2D (channels_last), Flatten, Reshape, ReLU and Activation('relu'), inference-time
identities (Dropout, ...), Add and Concatenate (last axis), with linear or ReLU
activations, each layer used once, from the input to the CAM feature layer: chains and
residual graphs. A branch that has no neurons yet is constant over time, and is
broadcast where it joins one that has.
Anything else raises UnsupportedNetwork, and the pipeline falls back to nengo-dl.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from transforms import neuron_kernels
from transforms.buffers import check_features
from transforms.model_head import IDENTITY_AT_INFERENCE, CamHead, inbound_layers
from transforms.nengo_shim import nengo, tf, tf_keras
from transforms.spiking import SpikingSettings, convert

log = logging.getLogger(__name__)
layers = tf_keras.layers
RELUS = (tf_keras.activations.relu, tf.nn.relu)
LINEAR = (tf_keras.activations.linear, None)


_NONE = np.empty((0, 0, 0), np.float32)  # an absent output or projection target
_NO_KERNEL, _NO_TAPS = np.empty((0, 0), np.float32), np.empty((0, 0), np.int64)
# An image whose population has more nonzero outputs than this share of its neuron-steps
# sends them through TensorFlow's dense linear op instead of event by event. Measured on
# the shipped model, layer by layer: an event costs ~10-30x a dense multiply-add (more
# where spikes spread over the whole map), so the two break even at 3-6% nonzero; above
# 8%, no image of the sample (~5% on average) goes dense, and noise images of contrast 0.3-1
# (10-50% nonzero) run at 85-110 images/s instead of 40-65 event by event.
DENSE_ABOVE = 0.08
# The share of the memory this process may use that the engine's buffers may take: it
# holds each layer's values over all steps (nengo-dl, one step at a time), so a large
# network (VGG16 at 224x224: ~2.4 GB per image at 30 steps) runs fewer images at once.
MEMORY_SHARE = 0.25


class UnsupportedNetwork(ValueError):
    """The fast engine cannot run this network (the message says why)."""


@dataclass(frozen=True)
class Step:
    """One layer of the network: an op on its inputs, then (optionally) neurons.

    kind: "conv", "dense", "avgpool", "maxpool", "batchnorm" (kernel: the per-channel scale),
    "rescale" (Rescaling and Normalization: kernel the scale, bias the offset),
    "zeropad" (pads: ((top, bottom), (left, right)) rows and columns of zeros), "flatten",
    "reshape", "identity", "add" or "concat" (over the last axis); neurons: whether a
    neuron population (the layer's ReLU) follows; bias_in_population: Dense-style bias
    (J = scale W x + scale b) rather than Conv2D-style (J = scale (W x + b)); inputs: the
    indices of the steps it reads, -1 for the model's input; raw_output: the population's
    output is read by TensorNode layers (``in_tensor_node``), so without a synapse.
    """

    name: str
    kind: str
    neurons: bool
    kernel: np.ndarray | None = None
    bias: np.ndarray | None = None
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    pool: tuple[int, int] = (1, 1)
    pads: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    shape: tuple[int, ...] = ()
    bias_in_population: bool = False
    output_shape: tuple[int, ...] = ()
    inputs: tuple[int, ...] = (-1,)
    raw_output: bool = False


def _activation(layer) -> bool:
    """True for a ReLU activation (neurons), False for linear; else unsupported."""
    activation = getattr(layer, "activation", None)
    if activation in RELUS:
        return True
    if activation in LINEAR:
        return False
    raise UnsupportedNetwork(f"layer {layer.name!r}: activation {getattr(activation, '__name__', activation)!r}")


def _batch_normalization(layer: layers.BatchNormalization) -> Step:
    """Inference-time batch normalization as a step: scale and offset per channel, in
    float32 as NengoDL's converter computes them (``ConvertBatchNormalization``)."""
    if list(layer.axis) != [len(layer.input.shape) - 1]:
        raise UnsupportedNetwork(f"layer {layer.name!r}: batch normalization over an axis other than the last")
    gamma = layer.gamma.numpy() if layer.scale else 1
    beta = layer.beta.numpy() if layer.center else 0
    scale = gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
    offset = beta - scale * layer.moving_mean.numpy()
    return Step(layer.name, "batchnorm", False, np.asarray(scale, np.float32), np.asarray(offset, np.float32))


def _normalization(layer: layers.Normalization) -> Step:
    """Normalization, (x - mean) / max(sqrt(variance), eps) per channel (or its inverse), as
    a rescale step: x * (1 / d) - mean / d, equal to ~1 float32 ulp. NengoDL's converter
    runs it in a TensorNode, as Rescaling."""
    if tuple(layer.axis) not in ((), (-1,), (len(layer.input.shape) - 1,)):
        raise UnsupportedNetwork(f"layer {layer.name!r}: normalization over an axis other than the last")
    mean = np.asarray(layer.mean, np.float32).ravel()
    spread = np.asarray(tf.maximum(tf.sqrt(layer.variance), tf_keras.backend.epsilon()), np.float32).ravel()
    scale, offset = (spread, mean) if layer.invert else (1 / spread, -mean / spread)
    return Step(layer.name, "rescale", False, scale, offset)


def _inbound_layers(layer) -> list:
    """The layers feeding ``layer``, in input order; UnsupportedNetwork if it is used twice."""
    if len(layer.inbound_nodes) != 1:
        raise UnsupportedNetwork(f"layer {layer.name!r} is used {len(layer.inbound_nodes)} times")
    return inbound_layers(layer)


def _graph(model: tf_keras.Model, head: CamHead) -> list:
    """The layers the CAM feature layer depends on (the input's excluded), in the model's
    own (topological) order, which is the converter's."""
    needed, stack = set(), [model.get_layer(head.feature_layer)]
    while stack:
        layer = stack.pop()
        if layer.name not in needed and not isinstance(layer, layers.InputLayer):
            needed.add(layer.name)
            stack.extend(_inbound_layers(layer))
    return [layer for layer in model.layers if layer.name in needed]


def plan(model: tf_keras.Model, head: CamHead) -> list[Step]:
    """The steps from the model's input to the CAM feature layer (the last), in order."""
    graph = _graph(model, head)
    index = {layer.name: i for i, layer in enumerate(graph)}
    steps = []
    for layer in graph:
        output_shape = tuple(layer.output.shape[1:])
        inputs = tuple(index.get(inbound.name, -1) for inbound in _inbound_layers(layer))
        if len(inputs) > 1 and not isinstance(layer, (layers.Add, layers.Concatenate)):
            raise UnsupportedNetwork(f"layer {layer.name!r} ({type(layer).__name__}) has {len(inputs)} inputs")
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
        elif isinstance(layer, (layers.AveragePooling2D, layers.MaxPooling2D)):
            if layer.data_format != "channels_last":
                raise UnsupportedNetwork(f"layer {layer.name!r}: channels_first pooling")
            kind = "avgpool" if isinstance(layer, layers.AveragePooling2D) else "maxpool"
            steps.append(Step(layer.name, kind, False, pool=tuple(layer.pool_size), strides=tuple(layer.strides),
                              padding=layer.padding.upper()))
        elif isinstance(layer, layers.BatchNormalization):
            steps.append(_batch_normalization(layer))
        elif isinstance(layer, layers.ZeroPadding2D):
            if layer.data_format != "channels_last":
                raise UnsupportedNetwork(f"layer {layer.name!r}: channels_first zero padding")
            steps.append(Step(layer.name, "zeropad", False, pads=tuple(tuple(side) for side in layer.padding)))
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
        elif isinstance(layer, layers.Rescaling):
            offset = np.asarray(layer.offset, np.float32)
            steps.append(Step(layer.name, "rescale", False, np.asarray(layer.scale, np.float32),
                              offset if offset.any() else None))
        elif isinstance(layer, layers.Normalization):
            steps.append(_normalization(layer))
        elif isinstance(layer, IDENTITY_AT_INFERENCE):
            steps.append(Step(layer.name, "identity", False))
        elif isinstance(layer, layers.Add):
            steps.append(Step(layer.name, "add", False))
        elif isinstance(layer, layers.Concatenate):
            if layer.axis not in (-1, len(output_shape)):
                raise UnsupportedNetwork(f"layer {layer.name!r}: concatenation over an axis other than the last")
            steps.append(Step(layer.name, "concat", False))
        else:
            raise UnsupportedNetwork(f"layer {layer.name!r} ({type(layer).__name__}) is not supported")
        steps[-1] = dataclasses.replace(steps[-1], output_shape=output_shape, inputs=inputs)
    for index, step in enumerate(steps):
        into_tensor_nodes = {in_tensor_node(steps[c]) for c in consumers(steps, index)} if step.neurons else set()
        if len(into_tensor_nodes) > 1:
            raise UnsupportedNetwork(f"layer {step.name!r} feeds both a layer nengo-dl runs in a TensorNode "
                                     "(no synapse) and others")
        steps[index] = dataclasses.replace(step, raw_output=into_tensor_nodes == {True})
    return steps


def consumers(steps: list[Step], index: int) -> list[int]:
    """The steps that read step ``index``'s output, looking through Flatten and Reshape
    (the converter hands them the object below)."""
    found = []
    for reader, step in enumerate(steps):
        if index in step.inputs:
            found += consumers(steps, reader) if step.kind in ("flatten", "reshape") else [reader]
    return found


def checked_plan(model: tf_keras.Model, head: CamHead, neuron_layers: tuple[str, ...]) -> list[Step]:
    """``plan``, checked against the converter's neuron layers (``neuron_layers``), whose
    initial states and rate probes the engine reuses; UnsupportedNetwork if they differ."""
    steps = plan(model, head)
    planned = tuple(step.name for step in steps if step.neurons)
    if planned != neuron_layers:
        raise UnsupportedNetwork(f"neuron layers {planned} differ from the converter's {neuron_layers}")
    return steps


def memory_limit() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def default_memory_budget() -> int:
    """The engine's buffers may take ``MEMORY_SHARE`` of ``memory_limit()``."""
    return int(MEMORY_SHARE * memory_limit())


def bytes_per_image(steps: list[Step], n_steps: int) -> int:
    """The engine's peak memory per image of a batch in flight (bytes): float32 values of
    every neuron layer over all steps, plus twice the largest layer for TensorFlow's
    outputs, and a quarter more. Measured (peak resident set, per image in flight; this
    estimate in brackets): the shipped model 8-22 MB (39 MB); a 96x96 VGG-like network
    whose spikes all went dense 134-149 MB (221 MB); VGG16 at 224x224 ~2.4 GB (3.0 GB);
    ResNet50 at 128x128 0.49 GB (0.53 GB: residual branches keep more values alive)."""
    neurons = sum(int(np.prod(step.output_shape)) for step in steps if step.neurons)
    largest = max(int(np.prod(step.output_shape)) for step in steps)
    return int(1.25 * 4 * n_steps * (neurons + 2 * largest))


def engine_batches(steps: list[Step], settings: SpikingSettings, concurrent: int, budget: int) -> tuple[int, int]:
    """(images per engine batch, batches at once) within ``budget`` bytes: up to
    ``settings.batch_size`` and ``concurrent``, fewer where a large network's values over
    all steps would not fit. UnsupportedNetwork if one image alone does not fit."""
    per_image = bytes_per_image(steps, settings.n_steps)
    for at_once in range(concurrent, 0, -1):
        images = min(settings.batch_size, budget // (per_image * at_once))
        if images >= 1:
            return int(images), at_once
    raise UnsupportedNetwork(
        f"its values over {settings.n_steps} steps need ~{per_image / 1e9:.2f} GB per image, more than the "
        f"{budget / 1e9:.2f} GB its buffers may take; nengo-dl steps through time")


def effective_settings(
    model: tf_keras.Model, head: CamHead, settings: SpikingSettings, neuron_layers: tuple[str, ...],
    memory_budget: int | None = None,
) -> SpikingSettings:
    """``settings`` with the engine that will run: "fast" only where it supports the network
    (``neuron_layers``: the converter's) and one image's values over all steps fit
    ``memory_budget`` bytes (None: ``default_memory_budget()``), else "nengo-dl", saying
    why in the log."""
    if settings.engine != "fast":
        return settings
    try:
        steps = checked_plan(model, head, neuron_layers)
        engine_batches(steps, settings, 1, default_memory_budget() if memory_budget is None else memory_budget)
    except UnsupportedNetwork as err:
        log.warning("engine 'fast' does not support this network (%s): using 'nengo-dl'", err)
        return dataclasses.replace(settings, engine="nengo-dl")
    return settings


def in_tensor_node(step: Step) -> bool:
    """Whether NengoDL's converter runs the step's layer in a TensorNode (max pooling,
    average pooling with 'same' padding, which counts only the cells inside the map, and
    Rescaling and Normalization, for which it has no converter)."""
    return step.kind in ("maxpool", "rescale") or (step.kind == "avgpool" and step.padding == "SAME")


SPIKING = ("spiking-relu", "lif")  # neuron types whose outputs are sparse events
PASS_THROUGH = ("flatten", "reshape", "identity")  # steps that leave the flat values as they are


@dataclass(frozen=True)
class Projection:
    """A Conv2D or Dense step run event by event on the spikes of the population below
    (``neuron_kernels._project``).

    target: the step's index; kernel: (kh * kw * C, K); offsets, rows: (H * W, kh * kw)
    for each input pixel, the output offsets its taps reach and their kernel rows;
    shape: the step's output shape.
    """

    target: int
    kernel: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    shape: tuple[int, ...]


def _as_3d(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A value shape as (H, W, C), leading axes of 1 added (a Dense acts on the last axis)."""
    return (1,) * (3 - len(shape)) + tuple(shape)


def _taps(step: Step, kernel: np.ndarray, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int]
          ) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, rows) of a Projection: out[oy, ox] += in[oy * sy + ky - pad_top, ...] *
    kernel[ky, kx], TensorFlow's convolution with its 'SAME' padding (extra on the bottom
    and right)."""
    (height, width, channels), (out_h, out_w, n_out), (kh, kw) = in_shape, out_shape, kernel.shape[:2]
    (sy, sx), (pad_top, pad_left) = step.strides, (0, 0)
    if step.padding == "SAME":
        pad_top = max((out_h - 1) * sy + kh - height, 0) // 2
        pad_left = max((out_w - 1) * sx + kw - width, 0) // 2
    offsets = np.full((height * width, kh * kw), -1, np.int64)
    rows = np.zeros_like(offsets)
    for y, x in np.ndindex(height, width):
        reached = [((oy // sy) * out_w + ox // sx, ky * kw + kx)
                   for ky in range(kh) for kx in range(kw)
                   for oy, ox in [(y + pad_top - ky, x + pad_left - kx)]
                   if 0 <= oy < out_h * sy and oy % sy == 0 and 0 <= ox < out_w * sx and ox % sx == 0]
        for tap, (pixel, row) in enumerate(reached):
            offsets[y * width + x, tap], rows[y * width + x, tap] = pixel * n_out, row * channels
    return offsets, rows


def _only_reader(steps: list[Step], index: int) -> int | None:
    """The step after ``index``, where it is the only one to read ``index``'s output."""
    readers = [reader for reader, step in enumerate(steps) if index in step.inputs]
    return readers[0] if readers == [index + 1] and steps[index + 1].inputs == (index,) else None


def projections(steps: list[Step]) -> dict[int, Projection]:
    """For each neuron step whose output reaches the next neuron layer's Conv2D or Dense
    through reshapes and identities only, each the only reader of the one before: that
    step, as a Projection (keyed by the source step's index)."""
    found = {}
    for source, step in enumerate(steps):
        target = _only_reader(steps, source)
        while target is not None and steps[target].kind in PASS_THROUGH and not steps[target].neurons:
            target = _only_reader(steps, target)
        if not step.neurons or target is None:
            continue
        into = steps[target]
        if into.kind not in ("conv", "dense") or not into.neurons:
            continue
        kernel = into.kernel if into.kind == "conv" else into.kernel.reshape(1, 1, *into.kernel.shape)
        offsets, rows = _taps(into, kernel, _as_3d(steps[target - 1].output_shape), _as_3d(into.output_shape))
        flat = np.ascontiguousarray(kernel, np.float32).reshape(-1, kernel.shape[3])
        found[source] = Projection(target, flat, offsets, rows, into.output_shape)
    return found


def _initial_states(converted, neuron_layers: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """Initial neuron states of each neuron layer, as nengo's builder draws them
    (``nengo.builder.neurons.build_neurons``: from ``RandomState(seed + 1)``, where ``seed``
    is what ``seed_network`` gives the layer's ensemble), without building the rest of the
    network (its evaluation points alone took ~0.3 s for the shipped model)."""
    seeds, seeded = {}, {}
    nengo.builder.network.seed_network(converted.net, seeds, seeded)
    ensembles = {ens.label.rsplit(".", 1)[0]: ens for ens in converted.net.all_ensembles}
    states = {}
    for name in neuron_layers:
        ens = ensembles[name]
        drawn = ens.neuron_type.make_state(ens.n_neurons, np.random.RandomState(seeds[ens] + 1), nengo.rc.float_dtype)
        states[name] = {k: np.asarray(v, np.float32).ravel() for k, v in drawn.items()
                        if k in ("voltage", "refractory_time")}
    return states


def _decay(tau: float | None, dt: float) -> float | None:
    """A lowpass synapse's decay per step, exp(-dt / tau); None for no synapse."""
    return None if tau is None or tau == 0 else math.exp(-dt / tau)


def _synapses(taus: tuple, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, 1 - a) per synapse, float32 as nengo-dl rounds them; NaN for no synapse."""
    decays = [_decay(tau, dt) for tau in taus]
    return (np.array([np.nan if a is None else a for a in decays], np.float32),
            np.array([np.nan if a is None else 1 - a for a in decays], np.float32))


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialized float32 array starting on a 64-byte boundary, so that TensorFlow
    reads it in place (``_as_tensor``) instead of copying it."""
    size = int(np.prod(shape)) * 4
    raw = np.empty(size + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + size].view(np.float32).reshape(shape)


def _readonly(array: np.ndarray) -> np.ndarray:
    """A read-only view: the scan's input is one array type whether TensorFlow or numpy
    produced it, so numba compiles and caches it once."""
    view = array.view()
    view.flags.writeable = False
    return view


def _as_tensor(array: np.ndarray) -> tf.Tensor:
    """A tensor sharing ``array``'s memory (64-byte aligned, C-contiguous), without a copy."""
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def _as_array(tensor: tf.Tensor) -> np.ndarray:
    """A read-only array viewing ``tensor``'s memory, without the copy that
    ``Tensor.numpy()`` makes (TensorFlow's documented ``memoryview`` route)."""
    return np.asarray(memoryview(tensor))


class FastSpikingNetwork:
    """The converted network run layer by layer over all timesteps (see module docstring).

    Same interface as ``transforms.spiking.SpikingNetwork``.
    """

    def __init__(self, model: tf_keras.Model, head: CamHead, settings: SpikingSettings, concurrent_batches: int = 2,
                 dense_above: float = DENSE_ABOVE, memory_budget: int | None = None):
        """concurrent_batches: minibatches simulated at once, from as many threads (every
        batch runs in one of them, so there are as many sets of layer buffers, each ~125 MB
        for the shipped model at batch 16 x 30 steps with spiking neurons, up to ~350 MB
        once images have gone dense, ~250 MB with rate neurons). A scan runs on one core,
        so a second batch in flight keeps another core busy while the first convolves or
        scans. dense_above: ``DENSE_ABOVE`` (inf: always event by event; 0: always dense).
        memory_budget: bytes the buffers may take (None: ``default_memory_budget()``);
        batches are smaller, or fewer at once, where a large network needs it
        (``engine_batches``; an image's values do not depend on its batch)."""
        self.head = head
        self.settings = settings
        converted = convert(model, head, settings)
        self.neuron_layers = converted.neuron_layers
        self.steps = checked_plan(model, head, self.neuron_layers)
        if not any(step.neurons for step in self.steps):
            raise UnsupportedNetwork("no neuron layer before the feature map")
        self._states = _initial_states(converted, self.neuron_layers)
        self._projections = projections(self.steps) if settings.neuron in SPIKING else {}
        self._last_reader = {i: index for index, step in enumerate(self.steps) for i in step.inputs}
        self.dense_above = dense_above
        budget = default_memory_budget() if memory_budget is None else memory_budget
        self.batch_size, self.batches_at_once = engine_batches(self.steps, settings, concurrent_batches, budget)
        if self.batch_size < settings.batch_size:
            log.info("engine batches of %d images (not %d), %d at once: this network's values over %d steps take "
                     "~%.2f GB per image, within %.1f GB", self.batch_size, settings.batch_size, self.batches_at_once,
                     settings.n_steps, bytes_per_image(self.steps, settings.n_steps) / 1e9, budget / 1e9)
        self._biases: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._workspace = threading.local()
        self._pool = ThreadPoolExecutor(self.batches_at_once) if self.batches_at_once > 1 else None

    def close(self) -> None:
        """Stop the batch threads (same interface as SpikingNetwork)."""
        if self._pool is not None:
            self._pool.shutdown()

    def _bias_terms(self, index: int, neuron_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(b_in, b_out) of ``neuron_kernels._current`` for step ``index``, one per neuron."""
        if index not in self._biases:
            step, scale = self.steps[index], np.float32(self.settings.scale_firing_rates)
            zeros = np.zeros(int(np.prod(neuron_shape)), np.float32)
            bias = zeros if step.bias is None else np.broadcast_to(step.bias, neuron_shape).astype(np.float32).ravel()
            self._biases[index] = (zeros, scale * bias) if step.bias_in_population else (bias, zeros)
        return self._biases[index]

    def _neurons(self, index: int, y: np.ndarray, neuron_shape: tuple[int, ...], outs: tuple[np.ndarray, ...],
                 taus: tuple, rates: np.ndarray, filtered_input: bool = False,
                 projection: Projection | None = None, z: np.ndarray = _NONE) -> np.ndarray:
        """Run step ``index``'s neurons on its linear output ``y`` (B, T, N), or (B, 1, N) if
        the same at every step; write the output through each synapse of ``taus`` to
        ``outs`` (B, T, N) and the mean firing rate (Hz) to ``rates`` (B, T).

        filtered_input: y is the linear op of the layer below's spikes, to be filtered by
        the synapse here; projection: this layer's spikes through the next layer's linear
        op into z (B, T, M), event by event (``neuron_kernels._project``), for each image
        with at most ``dense_above`` of its outputs nonzero. Returns the next layer's input
        (B, T, M): z, with the other images' rows from ``_dense_projection``."""
        s, state = self.settings, self._states[self.steps[index].name]
        scale = np.float32(s.scale_firing_rates)
        zeros = np.zeros(y.shape[2], np.float32)
        b_in, b_out = self._bias_terms(index, neuron_shape)
        limit = int(min(self.dense_above, 1) * y.shape[2] * s.n_steps) if projection else 0
        dense = self._population(y, s.synapse if filtered_input else None, b_in, b_out, scale, s.neuron, 1 / scale,
                                 state.get("voltage", zeros), state.get("refractory_time", zeros), taus, outs, rates,
                                 projection, z, limit)
        images = np.flatnonzero(dense)
        if not len(images):
            return z
        return self._dense_projection(index, y, neuron_shape, rates, filtered_input, projection, z, images)

    def _dense_projection(self, index: int, y: np.ndarray, neuron_shape: tuple[int, ...], rates: np.ndarray,
                          filtered_input: bool, projection: Projection, z: np.ndarray, images: np.ndarray
                          ) -> np.ndarray:
        """``_neurons`` for ``images``, whose spikes go through TensorFlow's dense linear op:
        into a buffer, then that op on them. Returns z with their rows replaced, or the op's
        output itself where every image is one of them. (An image's values are the same
        whichever others share the op: checked in the tests.)"""
        steps, every = self.settings.n_steps, len(images) == len(y)
        spikes = self._buffer(("spikes", index), (len(y), steps, y.shape[2]))[: len(images)]
        part_rates = np.empty((len(images), steps), np.float32)
        self._neurons(index, y if every else y[images], neuron_shape, (spikes,), (None,), part_rates, filtered_input)
        rates[images] = part_rates
        step, shape = self.steps[projection.target], self.steps[projection.target - 1].output_shape
        linear = _as_array(self._linear(step, tf.reshape(_as_tensor(spikes), (-1,) + shape)))
        if every:
            return linear.reshape(z.shape)
        z[images] = linear.reshape((len(images),) + z.shape[1:])
        return z

    def _population(self, y, input_tau, b_in, b_out, scale, neuron, amplitude, voltage, refractory, taus, outs,
                    rates, projection: Projection | None = None, z: np.ndarray = _NONE, limit: int = 0) -> np.ndarray:
        """``neuron_kernels.run_population`` with every argument in the one type it is compiled
        for; input_tau: the lowpass on y, None for none. Returns its ``dense`` flags."""
        input_synapse = np.array(_synapses((input_tau,), self.settings.dt)).ravel()
        decays, gains = _synapses(taus, self.settings.dt)
        padded = np.full(2, np.nan, np.float32)
        outs = tuple(outs) + (_NONE,) * (2 - len(outs))
        kernel, offsets, rows, z = (projection.kernel, projection.offsets, projection.rows, z) if projection else (
            _NO_KERNEL, _NO_TAPS, _NO_TAPS, _NONE)
        dense = np.zeros(len(y), np.uint8)
        neuron_kernels.run_population(
            _readonly(y), input_synapse, b_in, b_out, np.float32(scale), neuron_kernels.NEURONS[neuron],
            np.float32(self.settings.dt), np.float32(amplitude), voltage, refractory,
            np.concatenate([decays, padded])[:2], np.concatenate([gains, padded])[:2], outs, len(taus), rates, kernel,
            offsets, rows, z, limit, dense)
        return dense

    def _lowpass(self, x: np.ndarray, out: np.ndarray, tau: float | None) -> None:
        """x (B, T, N) through a lowpass synapse ``tau`` into ``out`` (B, T, N)."""
        zeros = np.zeros(x.shape[2], np.float32)
        self._population(x, None, zeros, zeros, 1, "identity", 1, zeros, zeros, (tau,), (out,),
                         np.empty(x.shape[:2], np.float32))

    def _input(self, step: Step, values: dict, n: int) -> tuple[tf.Tensor, bool]:
        """The step's op on its inputs' values (each (B, T, ...) over time, or (B, ...) where
        constant); returns it, and whether it is over time."""
        inputs = [values[i] for i in step.inputs]
        over_time = any(over for _, over in inputs)
        if step.kind in ("add", "concat"):
            steps = self.settings.n_steps
            parts = [x if over or not over_time else tf.broadcast_to(x[:, None], (n, steps) + tuple(x.shape[1:]))
                     for x, over in inputs]
            return (tf.add_n(parts) if step.kind == "add" else tf.concat(parts, axis=-1)), over_time
        x = inputs[0][0]
        y = self._linear(step, tf.reshape(x, (-1,) + tuple(x.shape[2:])) if over_time else x)
        return (tf.reshape(y, (n, self.settings.n_steps) + tuple(y.shape[1:])) if over_time else y), over_time

    def _linear(self, step: Step, x: tf.Tensor) -> tf.Tensor:
        """The step's op on (N, ...) values, without bias (linear but for max pooling)."""
        if step.kind == "conv":
            return tf.nn.conv2d(x, step.kernel, strides=step.strides, padding=step.padding)
        if step.kind == "dense":
            return tf.tensordot(x, step.kernel, axes=1)
        if step.kind == "avgpool":
            return tf.nn.avg_pool2d(x, step.pool, step.strides, step.padding)
        if step.kind == "maxpool":
            return tf.nn.max_pool2d(x, step.pool, step.strides, step.padding)
        if step.kind in ("batchnorm", "rescale"):
            return x * step.kernel
        if step.kind == "zeropad":
            return tf.pad(x, ((0, 0), *step.pads, (0, 0)))
        if step.kind == "flatten":
            return tf.reshape(x, (tf.shape(x)[0], -1))
        if step.kind == "reshape":
            return tf.reshape(x, (tf.shape(x)[0],) + step.shape)
        return x

    def _simulate(self, images: np.ndarray, features: np.ndarray, logits: np.ndarray, rates: np.ndarray) -> None:
        """Simulate one minibatch: images (B, H, W, C) into features (B, T, h, w, c), logits
        (B, T, K) and rates (B, T, L). Values are batch-major (B, T, ...) once neurons start;
        a layer's linear op runs on all B x T of them at once, or, on spikes, event by
        event inside the scan below (``projections``)."""
        s = self.settings
        n, steps, last = len(images), s.n_steps, len(self.steps) - 1
        values = {-1: (tf.constant(images), False)}  # each step's output, and whether it is over time
        # (L, B, T): each layer's rates contiguous, as every scan's are (one compiled signature)
        layer_rates = np.empty((rates.shape[2], n, steps), np.float32)
        projected: dict[int, tuple[Projection, np.ndarray]] = {}  # target: the projection run into it, into z
        skipped: set[int] = set()  # reshapes on the way to a projected step
        layer = 0
        for index, step in enumerate(self.steps):
            if index in skipped:
                continue
            incoming = projected.pop(index, None)
            if incoming is not None:  # this step's linear op ran in the scan below
                neuron_shape, y = incoming[0].shape, incoming[1]
            else:
                y, over_time = self._input(step, values, n)
                for i in step.inputs:
                    if self._last_reader[i] == index:
                        del values[i]
                if not step.neurons:
                    values[index] = (y if step.bias is None else y + step.bias, over_time)
                    continue
                neuron_shape = tuple(y.shape[2:] if over_time else y.shape[1:])
                y = _as_array(y)
            size, filtered_input = int(np.prod(neuron_shape)), incoming is not None
            projection, z = self._projections.get(index), _NONE
            if projection is not None:
                z = self._buffer(index, (n, steps, int(np.prod(projection.shape))))
                outs, taus = (), ()
            elif index == last and s.probe_synapse == s.synapse:  # the probe reads what the GAP reads
                outs, taus = (features.reshape(n, steps, size),), (s.synapse,)
                values[index] = (features, True)
            else:
                filtered = self._buffer(index, (n, steps) + neuron_shape)
                outs, taus = (filtered.reshape(n, steps, size),), (None if step.raw_output else s.synapse,)
                if index == last:  # the feature layer's own neurons: the probe reads them too
                    outs, taus = outs + (features.reshape(n, steps, size),), taus + (s.probe_synapse,)
                values[index] = (_as_tensor(filtered), True)
            z = self._neurons(index, y.reshape(n, -1, size), neuron_shape, outs, taus, layer_rates[layer],
                              filtered_input, projection, z)
            if projection is not None:
                projected[projection.target] = (projection, z)
                skipped.update(range(index + 1, projection.target))
            layer += 1
        rates[:] = layer_rates.transpose(1, 2, 0)
        x = values[last][0]
        x = x if isinstance(x, np.ndarray) else _as_array(x)
        if not self.steps[-1].neurons:  # a linear feature layer after the last neurons
            self._lowpass(x.reshape(n, steps, -1), features.reshape(n, steps, -1), s.probe_synapse)
        pooled = x.mean(axis=(2, 3), dtype=np.float32)  # GAP of what the Dense reads: (B, T, C)
        logits[:] = pooled @ self.head.weights + self.head.bias

    def _buffer(self, key: Hashable, shape: tuple[int, ...]) -> np.ndarray:
        """This thread's aligned buffer ``key`` of ``shape``, reused from batch to batch: a
        fresh large array would cost a page fault per 4 KiB every time."""
        buffers = self._workspace.__dict__.setdefault("buffers", {})
        if key not in buffers or buffers[key].shape != shape:
            buffers[key] = _aligned_empty(shape)
        return buffers[key]

    def run(self, images: np.ndarray, features: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Simulate ``n_steps`` per image in minibatches of ``self.batch_size`` (the last padded).

        images: (N, H, W, C) float32; features: where to write the features (N, T, h, w, c)
        float32, C-contiguous (e.g. a ``BufferPool``'s), or None for a new array. Returns
        features (N, T, h, w, c), logits (N, T, K) and the mean firing rate (Hz) of each
        neuron layer at each step (N, T, L).
        """
        batch, n, steps = self.batch_size, len(images), self.settings.n_steps
        results = (check_features(features, (n, steps) + self.head.feature_shape),
                   np.empty((n, steps, self.head.n_classes), np.float32),
                   np.empty((n, steps, len(self.neuron_layers)), np.float32))

        def simulate(start: int) -> None:
            part = slice(start, start + batch)
            x = np.ascontiguousarray(images[part], np.float32)
            if len(x) == batch:
                self._simulate(x, *(result[part] for result in results))
                return
            # Padded to the full batch: the same shapes round the same way, so an image's
            # result does not depend on which images share its batch.
            padded = np.zeros((batch,) + x.shape[1:], np.float32)
            padded[: len(x)] = x
            outputs = tuple(self._buffer(("padded", i), (batch,) + result.shape[1:])
                            for i, result in enumerate(results))
            self._simulate(padded, *outputs)
            for result, output in zip(results, outputs):
                result[part] = output[: len(x)]

        starts = range(0, n, batch)
        for _ in self._pool.map(simulate, starts) if self._pool else map(simulate, starts):
            pass
        return results
