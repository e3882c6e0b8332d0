"""Finding the GAP -> Dense head in Keras graphs, and refusing models without one."""

import numpy as np
import pytest

from pipeline.sample import SAMPLE_MODEL
from transforms.model_head import (
    ModelHeadError,
    cam_model,
    find_cam_head,
    load_keras_model,
)
from transforms.nengo_shim import tf_keras

layers = tf_keras.layers


def test_finds_the_head_of_the_shipped_model():
    model = load_keras_model(SAMPLE_MODEL)
    head = find_cam_head(model)
    assert (head.feature_layer, head.dense_layer) == ("conv4", "logits")
    assert head.feature_shape == (16, 16, 64)
    assert head.input_shape == (64, 64, 1)
    weights, bias = model.get_layer("logits").get_weights()
    np.testing.assert_array_equal(head.weights, weights)
    np.testing.assert_array_equal(head.bias, bias)


def test_softmax_dropout_and_no_bias_are_handled():
    inputs = tf_keras.Input((10, 10, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="features")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(5, activation="softmax", use_bias=False, name="classes")(x)
    model = tf_keras.Model(inputs, outputs)
    head = find_cam_head(model)
    assert (head.feature_layer, head.dense_layer, head.n_classes) == ("features", "classes", 5)
    np.testing.assert_array_equal(head.bias, np.zeros(5, np.float32))

    images = np.random.default_rng(1).random((3, 10, 10, 3), dtype=np.float32)
    features, logits = cam_model(model, head).predict(images, verbose=0)
    # CAM identity on the pre-softmax logits: spatial mean of the CAM is the logit.
    cams = np.einsum("nyxc,ck->nkyx", features, head.weights)
    np.testing.assert_allclose(cams.mean((2, 3)), logits, rtol=1e-5, atol=1e-6)
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(softmax, model.predict(images, verbose=0), rtol=1e-5)


def test_flatten_head_is_refused_with_what_is_missing():
    inputs = tf_keras.Input((8, 8, 1))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    x = layers.Flatten(name="flat")(x)
    model = tf_keras.Model(inputs, layers.Dense(3, name="out")(x))
    with pytest.raises(ModelHeadError, match="GlobalAveragePooling2D directly before the Dense layer 'out'"):
        find_cam_head(model, "flat.h5")


def test_model_ending_in_a_conv_is_refused():
    inputs = tf_keras.Input((8, 8, 1))
    model = tf_keras.Model(inputs, layers.Conv2D(2, 3, name="conv")(inputs))
    with pytest.raises(ModelHeadError, match="need a Dense layer at the output"):
        find_cam_head(model, "conv.h5")
