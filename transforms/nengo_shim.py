"""Import nengo-dl 3.6 on TensorFlow 2.21 with tf-keras (Keras 2).

nengo-dl 3.6 (the last release) imports ``keras.engine.functional`` and
``keras.layers.BatchNormalizationV1/V2``. Since TF 2.16, ``keras`` is Keras 3, and the
Keras 2 engine lives in ``tf_keras.src.engine``. This module selects tf-keras
(``TF_USE_LEGACY_KERAS=1``, which must be set before TensorFlow is first imported) and
serves the tf-keras modules under the names nengo-dl asks for while it imports. Import it
before anything touches TensorFlow or nengo-dl::

    from transforms.nengo_shim import nengo, nengo_dl, tf, tf_keras

``tests/test_nengo_shim.py`` fails the day the shim is no longer needed or stops working.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from collections.abc import Iterator

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


@contextlib.contextmanager
def _keras2_names() -> Iterator[None]:
    """Serve nengo-dl 3.6's ``keras.*`` imports from tf-keras while the block runs.

    Stand-in modules ``keras``, ``keras.engine``, ``keras.engine.functional`` and
    ``keras.layers`` hold what nengo-dl takes from them (``Functional``, ``_build_map``,
    ``BatchNormalizationV1/V2``); afterwards ``sys.modules`` is as before, so a later
    ``import keras`` gets Keras 3 as usual. Keras 3 itself is never imported: that took
    ~1.2 s in every process (the launcher's and each worker's)."""
    keras = types.ModuleType("keras")
    keras.engine = types.ModuleType("keras.engine")
    keras.engine.functional = _functional
    keras.layers = types.ModuleType("keras.layers")
    for name in ("BatchNormalizationV1", "BatchNormalizationV2"):
        setattr(keras.layers, name, getattr(tf_keras.src.layers, name))
    keras.__path__ = keras.engine.__path__ = []  # packages, so that their submodules import
    stand_ins = {"keras": keras, "keras.engine": keras.engine, "keras.engine.functional": _functional,
                 "keras.layers": keras.layers}
    before = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in before.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


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


import nengo  # noqa: E402

_call = subprocess.call
subprocess.call = _gpu_check_in_process(_call)
try:
    with _keras2_names():
        import nengo_dl  # noqa: E402
finally:
    subprocess.call = _call

__all__ = ["nengo", "nengo_dl", "tf", "tf_keras"]
