"""Import nengo-dl 3.6 on TensorFlow 2.21 with tf-keras (Keras 2).

nengo-dl 3.6 (the last release) imports ``keras.engine.functional`` and
``keras.layers.BatchNormalizationV1/V2``. Since TF 2.16, ``keras`` is Keras 3, and the
Keras 2 engine lives in ``tf_keras.src.engine``. This module selects tf-keras
(``TF_USE_LEGACY_KERAS=1``, which must be set before TensorFlow is first imported) and
registers the tf-keras modules under the names nengo-dl asks for. Import it before
anything touches TensorFlow or nengo-dl::

    from transforms.nengo_shim import nengo, nengo_dl, tf, tf_keras

``tests/test_nengo_shim.py`` fails the day the shim is no longer needed or stops working.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "tensorflow" in sys.modules and not sys.modules["tensorflow"].keras.__name__.startswith("tf_keras"):
    raise ImportError(
        "TensorFlow was imported with Keras 3 before transforms.nengo_shim: import "
        "transforms.nengo_shim (or set TF_USE_LEGACY_KERAS=1) before tensorflow"
    )

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from tf_keras.src.engine import functional as _functional  # noqa: E402


def _register_keras2_aliases() -> None:
    """Expose tf-keras under the ``keras.*`` names that nengo-dl 3.6 imports."""
    import keras
    import keras.layers

    engine = types.ModuleType("keras.engine")
    engine.functional = _functional
    sys.modules.setdefault("keras.engine", engine)
    sys.modules.setdefault("keras.engine.functional", _functional)
    for name in ("BatchNormalizationV1", "BatchNormalizationV2"):
        if not hasattr(keras.layers, name):
            setattr(keras.layers, name, getattr(tf_keras.src.layers, name))


def _gpu_check_in_process(call):
    """``subprocess.call`` that answers nengo-dl's import-time GPU check here.

    ``nengo_dl.utils`` asks a new Python process, which imports TensorFlow, whether a GPU
    is visible: ~4 s of CPU in every process that imports nengo-dl (the launcher and each
    worker). Its reason, that ``list_physical_devices`` fixes TensorFlow's process-level
    settings, no longer holds: thread counts and visible devices can still be set after it.
    """

    def checked(args, *rest, **kwargs):
        if isinstance(args, list) and args[:2] == [sys.executable, "-c"] and "list_physical_devices('GPU')" in args[2]:
            return int(not tf.config.list_physical_devices("GPU"))
        return call(args, *rest, **kwargs)

    return checked


_register_keras2_aliases()

import nengo  # noqa: E402

_call = subprocess.call
subprocess.call = _gpu_check_in_process(_call)
try:
    import nengo_dl  # noqa: E402
finally:
    subprocess.call = _call

__all__ = ["nengo", "nengo_dl", "tf", "tf_keras"]
