"""Find the CAM head of a Keras model: the feature map that a GlobalAveragePooling2D reads,
and the Dense layer that reads the pooled vector.

CAM (Zhou et al. 2016) needs ``features (H, W, C) -> GAP -> Dense(K)``: the map for class
``k`` is ``sum_c features[..., c] * W[c, k]``, whose spatial mean plus ``b[k]`` is logit
``k``. Layers that are the identity at inference (Dropout and the like) may stand between
GAP and Dense; a softmax after the Dense is dropped, since CAMs are about logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transforms.keras_models import load_model, saved_keras_version
from transforms.nengo_shim import tf_keras

IDENTITY_AT_INFERENCE = (
    tf_keras.layers.Dropout,
    tf_keras.layers.SpatialDropout1D,
    tf_keras.layers.GaussianNoise,
    tf_keras.layers.GaussianDropout,
    tf_keras.layers.AlphaDropout,
    tf_keras.layers.ActivityRegularization,
)


class ModelHeadError(ValueError):
    """The model lacks the GAP -> Dense head that CAMs need."""


@dataclass(frozen=True)
class CamHead:
    """Where the CAM comes from in a Keras model.

    feature_layer: name of the layer whose output the GAP reads (the last convolutional
    feature map); feature_shape: its (H, W, C); dense_layer: name of the Dense layer after
    the GAP; weights: (C, K) float32; bias: (K,) float32, zeros where the Dense has none;
    input_shape: the model's (H, W, C) input.
    """

    feature_layer: str
    feature_shape: tuple[int, int, int]
    dense_layer: str
    weights: np.ndarray
    bias: np.ndarray
    input_shape: tuple[int, int, int]

    @property
    def n_classes(self) -> int:
        return int(self.weights.shape[1])


def load_keras_model(path: str | Path) -> tf_keras.Model:
    """Load a Keras model file as a flat, single-output tf-keras (Keras 2) model, without
    its training configuration (``transforms.keras_models``: Keras 3 files rebuilt, nested
    models inlined; ``_dense_output``)."""
    try:
        return _dense_output(load_model(path))
    except (OSError, ValueError, TypeError) as err:
        version = saved_keras_version(path)
        saved_by = f"Keras {version}" if version else "a tf-keras"
        raise ModelHeadError(f"{path}: cannot load as {saved_by} model: {err}") from err


def inbound_layers(layer: tf_keras.layers.Layer) -> list[tf_keras.layers.Layer]:
    """The layers feeding ``layer``, in input order; none for a layer called more than once."""
    nodes = layer.inbound_nodes
    inbound = nodes[0].inbound_layers if len(nodes) == 1 else []
    return inbound if isinstance(inbound, list) else [inbound]


def inbound_layer(layer: tf_keras.layers.Layer) -> tf_keras.layers.Layer:
    """The single layer feeding ``layer``; ModelHeadError if it has several or none."""
    inbound = inbound_layers(layer)
    if len(inbound) != 1:
        raise ModelHeadError(f"layer {layer.name!r} must have exactly one input")
    return inbound[0]


def _output_layer(model: tf_keras.Model, output) -> tf_keras.layers.Layer:
    """The layer that gives the model's ``output`` tensor, looking through a final
    Activation or Softmax."""
    layer = model.get_layer(output.node.layer.name)
    if isinstance(layer, (tf_keras.layers.Activation, tf_keras.layers.Softmax)):
        layer = inbound_layer(layer)
    return layer


def _dense_output(model: tf_keras.Model) -> tf_keras.Model:
    """``model`` with only the output a Dense layer gives, where it has several outputs and
    exactly one is such (a model that also outputs its pooled features or feature map, for
    inspection)."""
    if len(model.outputs) < 2:
        return model
    dense = [t for t in model.outputs if isinstance(_output_layer(model, t), tf_keras.layers.Dense)]
    return tf_keras.Model(model.inputs, dense[0], name=model.name) if len(dense) == 1 else model


def find_cam_head(model: tf_keras.Model, source: str = "model") -> CamHead:
    """Locate the feature map -> GlobalAveragePooling2D -> Dense path that ends the model.

    Raises ModelHeadError, naming ``source`` and what is missing, when the model's output
    is not a Dense layer fed (through inference-time identities only) by a
    GlobalAveragePooling2D over a 4-D feature map.
    """
    if not isinstance(model, tf_keras.Model) or len(model.outputs) != 1:
        raise ModelHeadError(f"{source}: the model must be a tf-keras model with one output")
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise ModelHeadError(f"{source}: the model must take one image input (H, W, C)")
    layer = _output_layer(model, model.outputs[0])
    if not isinstance(layer, tf_keras.layers.Dense):
        raise ModelHeadError(
            f"{source}: CAMs need a Dense layer at the output after GlobalAveragePooling2D; "
            f"the output comes from {layer.name!r} ({type(layer).__name__})"
        )
    dense = layer
    layer = inbound_layer(dense)
    while isinstance(layer, IDENTITY_AT_INFERENCE):
        layer = inbound_layer(layer)
    if not isinstance(layer, tf_keras.layers.GlobalAveragePooling2D):
        raise ModelHeadError(
            f"{source}: CAMs need GlobalAveragePooling2D directly before the Dense layer "
            f"{dense.name!r}; found {layer.name!r} ({type(layer).__name__}) there"
        )
    if getattr(layer, "keepdims", False) or layer.data_format != "channels_last":
        raise ModelHeadError(
            f"{source}: GlobalAveragePooling2D {layer.name!r} must be channels_last without keepdims"
        )
    feature = inbound_layer(layer)
    feature_shape = tuple(int(d) for d in feature.output.shape[1:])
    dense_weights = dense.get_weights()
    weights = np.asarray(dense_weights[0], np.float32)
    bias = (
        np.asarray(dense_weights[1], np.float32)
        if dense.use_bias
        else np.zeros(weights.shape[1], np.float32)
    )
    input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    if None in input_shape or None in feature_shape:
        raise ModelHeadError(f"{source}: the model's input size must be fixed, got {model.inputs[0].shape}")
    return CamHead(feature.name, feature_shape, dense.name, weights, bias, input_shape)


def _per_pixel_dense(layer: tf_keras.layers.Layer) -> bool:
    """A Dense layer on a feature map (B, H, W, C): a 1x1 convolution, which NengoDL's
    converter cannot convert as a Dense (it takes the input as flat)."""
    return isinstance(layer, tf_keras.layers.Dense) and len(layer.input.shape) == 4


def _as_conv(dense: tf_keras.layers.Dense) -> tf_keras.layers.Conv2D:
    """The 1x1 Conv2D that computes what the per-pixel ``dense`` does, under its name."""
    return tf_keras.layers.Conv2D(dense.units, 1, activation=dense.activation, use_bias=dense.use_bias,
                                  name=dense.name)


def inference_copy(model: tf_keras.Model) -> tf_keras.Model:
    """A copy of ``model`` as NengoDL's converter should see it, with the same weights:
    layers that are identities at inference (Dropout, ...) become linear Activations of
    the same name, and Dense layers on a feature map 1x1 Conv2Ds of the same name.

    NengoDL's Converter has no converter for Dropout and runs it in a TensorNode, which does
    not act as the identity; a linear Activation becomes a plain pass-through node. Its
    Dense converter takes the input as flat, and fails on a feature map.
    """
    if not any(isinstance(layer, IDENTITY_AT_INFERENCE) or _per_pixel_dense(layer) for layer in model.layers):
        return model

    def clone(layer):
        if isinstance(layer, IDENTITY_AT_INFERENCE):
            return tf_keras.layers.Activation("linear", name=layer.name)
        if _per_pixel_dense(layer):
            return _as_conv(layer)
        return layer.__class__.from_config(layer.get_config())

    copy = tf_keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        weights = model.get_layer(layer.name).get_weights()
        if weights:
            layer.set_weights([np.reshape(w, v.shape) for w, v in zip(weights, layer.weights)])
    return copy


def cam_model(model: tf_keras.Model, head: CamHead) -> tf_keras.Model:
    """A model from the same input to [feature map (B, H, W, C), logits (B, K)].

    The logits are the head's Dense layer without its activation (a softmax is dropped);
    layers that are identities at inference are replaced by pass-throughs.
    """
    model = inference_copy(model)
    features = model.get_layer(head.feature_layer).output
    pooled = tf_keras.layers.GlobalAveragePooling2D(name="cam_gap")(features)
    logits = tf_keras.layers.Dense(
        head.n_classes, use_bias=True, name="cam_logits"
    )(pooled)
    submodel = tf_keras.Model(model.inputs[0], [features, logits], name="cam_model")
    submodel.get_layer("cam_logits").set_weights([head.weights, head.bias])
    return submodel
