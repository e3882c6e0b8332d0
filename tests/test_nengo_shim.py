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


def test_shim_answers_nengo_dls_gpu_check_without_a_python_process():
    """nengo-dl's import-time GPU check runs in this process (no new Python importing
    TensorFlow, ~4 s per process), gives what TensorFlow says, and leaves the thread
    settings free for the workers to set."""
    code = """
import subprocess
def refuse(args, *rest, **kwargs):
    raise AssertionError(f"subprocess.call({args!r})")
subprocess.call = refuse
import transforms.nengo_shim as shim
assert subprocess.call is refuse, "the shim must put subprocess.call back"
gpus = shim.tf.config.list_physical_devices("GPU")
assert shim.nengo_dl.utils.tf_gpu_installed == bool(gpus), (shim.nengo_dl.utils.tf_gpu_installed, gpus)
shim.tf.config.threading.set_intra_op_parallelism_threads(1)
assert shim.tf.config.threading.get_intra_op_parallelism_threads() == 1
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_shim_leaves_keras_3_unimported_and_importable():
    """nengo-dl's ``keras.*`` names are served only while it imports: Keras 3 is not loaded
    (~1.2 s in every process), and a later ``import keras`` still gets Keras 3."""
    code = """
import sys
import transforms.nengo_shim
loaded = sorted(name for name in sys.modules if name == "keras" or name.startswith("keras."))
assert not loaded, loaded
import keras
assert keras.__version__.startswith("3"), keras.__version__
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
