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


_register_keras2_aliases()

import nengo  # noqa: E402
import nengo_dl  # noqa: E402

__all__ = ["nengo", "nengo_dl", "tf", "tf_keras"]
