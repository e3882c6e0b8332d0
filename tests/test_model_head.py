"""Finding the GAP -> Dense head in Keras graphs, and refusing models without one."""

import numpy as np
import pytest

from pipeline.sample import SAMPLE_MODEL
from transforms.fast_engine import plan
from transforms.model_head import (
    ModelHeadError,
    cam_model,
    find_cam_head,
    inference_copy,
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


def keras3_cnn(seed: int = 0, sequential: bool = False):
    """A CAM-ready CNN built with Keras 3 (what TensorFlow 2.16+ trains with), functional
    or sequential, for the shipped sample's 64x64 images and 10 classes:
    BatchNormalization, pooling, Dropout and a softmax head, with random weights (positive
    variances)."""
    import keras

    chain = [keras.layers.Conv2D(4, 3, strides=2, use_bias=False), keras.layers.BatchNormalization(),
             keras.layers.ReLU(), keras.layers.AveragePooling2D(2), keras.layers.Dropout(0.2),
             keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="features"),
             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax", name="classes")]
    if sequential:
        model = keras.Sequential([keras.Input((64, 64, 1)), *chain])
    else:
        x = inputs = keras.Input((64, 64, 1))
        for layer in chain:
            x = layer(x)
        model = keras.Model(inputs, x)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "variance" in v.path
                       else rng.normal(0, 0.5, w.shape).astype(np.float32)
                       for v, w in zip(model.weights, model.get_weights())])
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("sequential", [False, True], ids=["functional", "sequential"])
def test_keras3_model_files_are_rebuilt_in_tf_keras(tmp_path, suffix, sequential):
    """Keras 3's own files (tf-keras cannot read them) load as tf-keras models with the
    same outputs and CAM head, which the fast engine supports."""
    original = keras3_cnn(sequential=sequential)
    path = tmp_path / f"model{suffix}"
    original.save(path)
    model = load_keras_model(path)
    assert isinstance(model, tf_keras.Model)
    images = np.random.default_rng(1).random((4, 64, 64, 1), dtype=np.float32)
    np.testing.assert_allclose(model.predict(images, verbose=0), np.asarray(original(images)), rtol=1e-5, atol=1e-7)
    head = find_cam_head(model, str(path))
    assert (head.feature_layer, head.dense_layer, head.n_classes) == ("features", "classes", 10)
    np.testing.assert_array_equal(head.weights, original.get_layer("classes").get_weights()[0])
    assert [step.kind for step in plan(model, head)] == ["conv", "batchnorm", "identity", "avgpool", "identity", "conv"]


def test_keras3_layer_without_a_tf_keras_twin_is_refused_by_name(tmp_path):
    import keras

    x = inputs = keras.Input((8, 8, 1))
    x = keras.layers.RMSNormalization()(keras.layers.Conv2D(4, 3, activation="relu")(x))
    path = tmp_path / "rms.keras"
    keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))).save(path)
    with pytest.raises(ModelHeadError, match=f"{path}: cannot load as Keras 3.* model: layer 'rms_normalization' "
                                             r"\(RMSNormalization\) has no tf-keras equivalent"):
        load_keras_model(path)


@pytest.mark.parametrize("saved_by", ["tf-keras", "keras3"])
def test_nested_base_model_with_extra_outputs_is_flattened(tmp_path, saved_by):
    """The forum's model (shared/seeds): a base model called inside the model, then GAP and
    Dense, with the pooled features and the feature map as outputs too. It loads as one
    flat graph whose head is the base's last layer (VGG-style, a max pooling) and whose only
    output is the Dense's, the fast engine runs it, and its CAM model gives the original's
    feature map and pre-softmax logits."""
    import keras

    k = tf_keras if saved_by == "tf-keras" else keras
    x = base_input = k.Input((16, 16, 3))
    x = k.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = k.layers.Conv2D(6, 3, padding="same", activation="relu")(k.layers.MaxPooling2D(2)(x))
    base = k.Model(base_input, k.layers.MaxPooling2D(2, name="base_last")(x), name="base")  # VGG's include_top=False
    image = k.Input((16, 16, 3))
    features = base(image)
    pooled = k.layers.GlobalAveragePooling2D()(features)
    original = k.Model(image, [k.layers.Dense(5, activation="softmax", use_bias=False, name="classes")(pooled),
                               pooled, features])
    path = tmp_path / ("model.h5" if saved_by == "tf-keras" else "model.keras")
    original.save(path)

    model = load_keras_model(path)
    assert len(model.outputs) == 1 and not any(isinstance(layer, tf_keras.Model) for layer in model.layers)
    head = find_cam_head(model, str(path))
    assert (head.feature_layer, head.dense_layer, head.feature_shape) == ("base_last", "classes", (4, 4, 6))
    assert [step.kind for step in plan(model, head)] == ["conv", "maxpool", "conv", "maxpool"]  # the fast engine runs it
    images = np.random.default_rng(2).random((3, 16, 16, 3), dtype=np.float32)
    probabilities, _, feature_map = (np.asarray(t) for t in original(images))
    got_features, logits = cam_model(model, head).predict(images, verbose=0)
    np.testing.assert_allclose(got_features, feature_map, rtol=1e-5, atol=1e-6)
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(softmax, probabilities, rtol=1e-5, atol=1e-7)


def test_a_dense_layer_on_a_feature_map_reaches_the_converter_as_the_same_1x1_conv2d():
    """NengoDL's Dense converter takes its input as flat (on a feature map it fails with an
    Ensemble.bias shape error): the converter's copy of the model has a Conv2D of the same
    name in its place, with the same outputs; a Dense on a flat input stays a Dense."""
    inputs = tf_keras.Input((8, 8, 3))
    x = layers.Dense(5, activation="relu", name="pixels")(layers.Conv2D(4, 3, activation="relu")(inputs))
    x = layers.Dense(6, name="features")(layers.Dropout(0.5)(x))
    flat = layers.Dense(6, activation="relu", name="flat")(layers.GlobalAveragePooling2D()(x))
    model = tf_keras.Model(inputs, layers.Dense(2, name="classes")(flat))
    copy = inference_copy(model)
    assert [type(copy.get_layer(name)).__name__ for name in ("pixels", "features", "flat", "classes")] == [
        "Conv2D", "Conv2D", "Dense", "Dense"]
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(copy(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
