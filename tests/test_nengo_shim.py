"""The nengo-dl import shim: needed today, and working."""

import subprocess
import sys

import numpy as np


def test_nengo_dl_still_needs_the_shim():
    """Fails the day nengo-dl imports on this TensorFlow by itself: then delete the shim."""
    code = "import os; os.environ['TF_USE_LEGACY_KERAS'] = '1'; import nengo_dl"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0, "nengo_dl imports without transforms.nengo_shim: remove the shim"
    assert "No module named 'keras.engine'" in result.stderr


def test_shim_converts_and_simulates_a_keras_model():
    from transforms.nengo_shim import nengo, nengo_dl, tf, tf_keras

    assert tf.keras.__name__.startswith("tf_keras"), "tf.keras must be Keras 2 (tf-keras)"
    inputs = tf_keras.Input((6, 6, 1))
    x = tf_keras.layers.Conv2D(3, 3, activation="relu")(inputs)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf_keras.layers.Dense(2)(x)
    model = tf_keras.Model(inputs, outputs)
    converter = nengo_dl.Converter(
        model, swap_activations={tf_keras.activations.relu: nengo.RectifiedLinear()}
    )
    images = np.random.default_rng(0).random((2, 6, 6, 1), dtype=np.float32)
    with nengo_dl.Simulator(converter.net, minibatch_size=2, progress_bar=False) as sim:
        out = sim.predict_on_batch({converter.inputs[inputs]: images.reshape(2, 1, -1)})
    np.testing.assert_allclose(
        out[converter.outputs[outputs]][:, 0], model.predict(images, verbose=0), rtol=1e-5, atol=1e-6
    )
