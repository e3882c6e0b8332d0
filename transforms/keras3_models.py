"""Models saved by Keras 3 (``.keras`` or ``.h5``), rebuilt as tf-keras (Keras 2) models.

NengoDL converts tf-keras models only, but TensorFlow 2.16+ trains and saves with Keras 3,
whose files tf-keras cannot read. ``from_keras3`` loads such a file with Keras 3 and
rebuilds its graph layer by layer from the tf-keras layers of the same names (each
layer's configuration, less what tf-keras does not take and what only training uses:
initializers, regularizers, constraints), with the same weights, then checks that both
models give the same outputs. The graph is read from each layer's call record
(``_inbound_nodes``; Keras 3 has no public API for it). Keras 3 is imported only here
(~1.2 s).
"""

from __future__ import annotations

import inspect
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np

from transforms.nengo_shim import tf, tf_keras

TRAINING_ONLY = ("_initializer", "_regularizer", "_constraint")
BASE_ARGUMENTS = ("name", "trainable", "dtype")


class Keras3ModelError(ValueError):
    """A Keras 3 model that cannot be rebuilt in tf-keras (the message says why)."""


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


def _tf_keras_layer(layer) -> tf_keras.layers.Layer:
    """A new tf-keras layer configured as the Keras 3 ``layer``."""
    import keras

    cls = getattr(tf_keras.layers, type(layer).__name__, None)
    if cls is None or not isinstance(layer, keras.layers.Layer):
        raise Keras3ModelError(f"layer {layer.name!r} ({type(layer).__name__}) has no tf-keras equivalent")
    accepted = {name for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind is not inspect.Parameter.VAR_KEYWORD} | set(BASE_ARGUMENTS)
    config = {key: value for key, value in layer.get_config().items()
              if key in accepted and not key.endswith(TRAINING_ONLY)}
    return cls(**config | {"dtype": layer.dtype})


def _rebuild_layer(layer, inputs: list):
    """``layer`` in tf-keras, called on ``inputs`` (tf-keras tensors) and given its weights;
    its outputs, flat."""
    new = _tf_keras_layer(layer)
    outputs = tf.nest.flatten(new(inputs[0] if len(inputs) == 1 else inputs))
    try:
        new.set_weights(layer.get_weights())
    except ValueError as err:
        raise Keras3ModelError(f"layer {layer.name!r}: weights do not fit its tf-keras equivalent: {err}") from err
    return outputs


def _rebuild(model) -> tf_keras.Model:
    """The Keras 3 functional or sequential ``model``'s graph, in tf-keras layers."""
    import keras

    if isinstance(model, keras.Sequential):  # a chain, whatever its layers' call records say
        x = inputs = tf_keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                raise Keras3ModelError(f"layer {layer.name!r} is a nested model")
            (x,) = _rebuild_layer(layer, [x])
        return tf_keras.Model(inputs, x, name=model.name)
    tensors = {id(t): tf_keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t._keras_history.operation.name)
               for t in model.inputs}
    waiting = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    while waiting:
        ready = [layer for layer in waiting
                 if all(id(t) in tensors for t in layer._inbound_nodes[0].input_tensors)]
        if not ready:
            raise Keras3ModelError(f"cannot order the layers {[layer.name for layer in waiting]}")
        for layer in ready:
            if isinstance(layer, keras.Model):
                raise Keras3ModelError(f"layer {layer.name!r} is a nested model")
            if len(layer._inbound_nodes) != 1:
                raise Keras3ModelError(f"layer {layer.name!r} is used {len(layer._inbound_nodes)} times")
            node = layer._inbound_nodes[0]
            outputs = _rebuild_layer(layer, [tensors[id(t)] for t in node.input_tensors])
            tensors.update({id(t): out for t, out in zip(node.output_tensors, outputs)})
            waiting.remove(layer)
    outputs = [tensors[id(t)] for t in model.outputs]
    return tf_keras.Model([tensors[id(t)] for t in model.inputs], outputs[0] if len(outputs) == 1 else outputs,
                          name=model.name)


def from_keras3(path: str | Path) -> tf_keras.Model:
    """The Keras 3 model file ``path`` as a tf-keras model with the same layers and weights,
    checked to give the same outputs (to 1e-5) on a random batch; Keras3ModelError if it
    cannot be rebuilt."""
    import keras

    model = keras.saving.load_model(str(path), compile=False)
    rebuilt = _rebuild(model)
    shape = (2,) + tuple(model.inputs[0].shape[1:])
    if len(model.inputs) == 1 and None not in shape:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        expected, got = np.asarray(model(x, training=False)), np.asarray(rebuilt(x, training=False))
        if not np.allclose(got, expected, rtol=1e-5, atol=1e-5 * max(np.abs(expected).max(), 1e-30)):
            raise Keras3ModelError("its tf-keras rebuild gives other outputs (largest difference "
                                   f"{np.abs(got - expected).max():.3g})")
    return rebuilt
