"""Keras model files as flat tf-keras (Keras 2) models, which NengoDL converts.

- Models saved by Keras 3 (TensorFlow 2.16+'s ``keras``; ``.keras`` or ``.h5``), which
  tf-keras cannot read, are loaded with Keras 3 and rebuilt layer by layer from the tf-keras
  layers of the same names (each layer's configuration, less what tf-keras does not take
  and what only training uses: initializers, regularizers, constraints), with the same
  weights, then checked to give the same outputs. Keras 3 is imported only then (~1.2 s).
- Nested models (a ``keras.applications`` base called inside the model, as in
  ``x = vgg19(image)``) are inlined: their layers become the model's own, so that the
  feature map a GAP reads is a layer of one graph.

The graphs are read from each layer's call records (tf-keras's ``inbound_nodes``; Keras 3's
private ``_inbound_nodes``, for which it has no public API).
"""

from __future__ import annotations

import inspect
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from transforms.nengo_shim import tf, tf_keras

TRAINING_ONLY = ("_initializer", "_regularizer", "_constraint")
BASE_ARGUMENTS = ("name", "trainable", "dtype")


class KerasModelError(ValueError):
    """A model that cannot be made a flat tf-keras model (the message says why)."""


def saved_keras_version(path: str | Path) -> str | None:
    """The Keras version that saved the model file (``.keras`` zip or HDF5), None if unknown."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("metadata.json")).get("keras_version")
        with h5py.File(path, "r") as file:
            version = file.attrs.get("keras_version")
    except (OSError, KeyError, ValueError):
        return None
    return version.decode() if isinstance(version, bytes) else version


class _Graph:
    """How to read one Keras's graphs and copy its layers into tf-keras."""

    def __init__(self, keras_module, nodes: Callable, copy: Callable):
        self.keras, self.nodes, self.copy = keras_module, nodes, copy

    def call(self, layer, inputs: list) -> list:
        """A tf-keras copy of ``layer`` (or of a nested model's layers) on ``inputs``; its
        outputs, flat."""
        if isinstance(layer, self.keras.Model):
            return self.outputs(layer, inputs)
        new = self.copy(layer)
        outputs = tf.nest.flatten(new(inputs[0] if len(inputs) == 1 else inputs))
        try:
            new.set_weights(layer.get_weights())
        except ValueError as err:
            raise KerasModelError(f"layer {layer.name!r}: weights do not fit its tf-keras copy: {err}") from err
        return outputs

    def outputs(self, model, inputs: list) -> list:
        """``model``'s graph on ``inputs`` (tf-keras tensors, one per model input), layer by
        layer in tf-keras copies; its outputs."""
        if isinstance(model, self.keras.Sequential):  # a chain, whatever its layers' call records say
            (x,) = inputs
            for layer in model.layers:
                (x,) = self.call(layer, [x])
            return [x]
        tensors = {id(t): x for t, x in zip(model.inputs, inputs)}
        waiting = [layer for layer in model.layers if not isinstance(layer, self.keras.layers.InputLayer)]
        while waiting:
            ready = [(layer, node) for layer in waiting for node in self.nodes(layer)
                     if all(id(t) in tensors for t in tf.nest.flatten(node.input_tensors))]
            if not ready:
                raise KerasModelError(f"cannot follow the graph to layers {[layer.name for layer in waiting]}")
            for layer, node in ready:
                if layer not in waiting:
                    raise KerasModelError(f"layer {layer.name!r} is used more than once")
                outputs = self.call(layer, [tensors[id(t)] for t in tf.nest.flatten(node.input_tensors)])
                tensors.update({id(t): out for t, out in zip(tf.nest.flatten(node.output_tensors), outputs)})
                waiting.remove(layer)
        return [tensors[id(t)] for t in model.outputs]

    def flat_model(self, model) -> tf_keras.Model:
        inputs = [tf_keras.Input(shape=t.shape[1:], dtype=t.dtype) for t in model.inputs]
        outputs = self.outputs(model, inputs)
        return tf_keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=model.name)


def _tf_keras_copy(layer) -> tf_keras.layers.Layer:
    return layer.__class__.from_config(layer.get_config())


def _from_keras3_layer(layer) -> tf_keras.layers.Layer:
    """A new tf-keras layer configured as the Keras 3 ``layer``."""
    cls = getattr(tf_keras.layers, type(layer).__name__, None)
    if cls is None:
        raise KerasModelError(f"layer {layer.name!r} ({type(layer).__name__}) has no tf-keras equivalent")
    accepted = {name for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind is not inspect.Parameter.VAR_KEYWORD} | set(BASE_ARGUMENTS)
    config = {key: value for key, value in layer.get_config().items()
              if key in accepted and not key.endswith(TRAINING_ONLY)}
    return cls(**config | {"dtype": layer.dtype})


def _same_outputs(original, rebuilt: tf_keras.Model) -> None:
    """KerasModelError unless both models give the same outputs (to 1e-5) on a random batch."""
    shape = (2,) + tuple(original.inputs[0].shape[1:])
    if len(original.inputs) != 1 or None in shape:
        return
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for expected, got in zip(tf.nest.flatten(original(x, training=False)), tf.nest.flatten(rebuilt(x, training=False))):
        expected, got = np.asarray(expected), np.asarray(got)
        if not np.allclose(got, expected, rtol=1e-5, atol=1e-5 * max(np.abs(expected).max(), 1e-30)):
            raise KerasModelError("its tf-keras rebuild gives other outputs (largest difference "
                                  f"{np.abs(got - expected).max():.3g})")


def load_model(path: str | Path) -> tf_keras.Model:
    """The model file ``path`` as a flat tf-keras model (see the module docstring), without
    its training configuration. KerasModelError (or Keras's own error) if it cannot be."""
    version = saved_keras_version(path)
    if version and int(version.split(".")[0]) >= 3:
        import keras

        original = keras.saving.load_model(str(path), compile=False)
        model = _Graph(keras, lambda layer: layer._inbound_nodes, _from_keras3_layer).flat_model(original)
        _same_outputs(original, model)
    else:
        model = tf_keras.models.load_model(str(path), compile=False)
        if any(isinstance(layer, tf_keras.Model) for layer in model.layers):
            model = _Graph(tf_keras, lambda layer: layer.inbound_nodes, _tf_keras_copy).flat_model(model)
    return model
