"""Fit a decoded image to the model: channels, size, and the scaling it was trained with."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from transforms.nengo_shim import tf

SCALINGS = ("unit", "mean", "keras", "none")


@dataclass(frozen=True)
class Preprocessing:
    """scaling: ``unit`` (pixels / 255, in [0, 1]); ``mean`` ((pixels - mean) / std per
    channel, in 0..255 pixel units); ``keras`` (``tf_keras.applications.<keras_app>.
    preprocess_input`` on 0..255 pixels, e.g. keras_app="vgg19"); ``none`` (0..255 pixels
    as they are, for a model that scales its input itself, with a Rescaling or Normalization layer)."""

    scaling: str = "unit"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    keras_app: str = ""

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; choose from {SCALINGS}")
        if self.scaling == "mean" and not self.mean:
            raise ValueError("--scaling mean needs --mean (one value per channel, in 0..255)")
        if self.scaling == "keras":
            self.keras_function()  # fail early on an unknown application

    def keras_function(self):
        try:
            module = importlib.import_module(f"tf_keras.applications.{self.keras_app}")
            return module.preprocess_input
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"--keras-app {self.keras_app!r}: no tf_keras.applications.{self.keras_app}.preprocess_input"
            ) from err

    def describe(self) -> str:
        base = "decode to uint8, match channels (gray<->RGB by luminance), bilinear resize to the model input, "
        if self.scaling == "unit":
            return base + "scale to [0, 1]"
        if self.scaling == "none":
            return base + "keep 0..255 pixel values (the model scales its input)"
        if self.scaling == "mean":
            return base + f"subtract per-channel mean {list(self.mean)} and divide by std {list(self.std) or 1}"
        return base + f"tf_keras.applications.{self.keras_app}.preprocess_input"

    def apply(self, image: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
        """uint8 (h, w[, c]) -> float32 (H, W, C) for a model with ``input_shape``."""
        x = fit_to_input(image, input_shape)
        if self.scaling == "unit":
            return x / 255.0
        if self.scaling == "none":
            return x
        if self.scaling == "mean":
            std = np.asarray(self.std or (1.0,), np.float32)
            return (x - np.asarray(self.mean, np.float32)) / std
        return np.asarray(self.keras_function()(x[None].copy())[0], np.float32)


def fit_to_input(image: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 (h, w[, c]) -> float32 (H, W, C) pixels in 0..255: channels, then size.

    Gray is repeated to RGB, RGB is reduced to gray by luminance, alpha is dropped; the
    size is changed with bilinear resizing when it differs. Raises ValueError when the
    image cannot be fitted.
    """
    height, width, channels = input_shape
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or min(image.shape) == 0:
        raise ValueError(f"image has shape {image.shape}; expected (height, width, channels)")
    x = image.astype(np.float32)
    if x.shape[-1] in (2, 4):  # gray + alpha, RGB + alpha
        x = x[..., :-1]
    if x.shape[-1] != channels:
        if channels == 1 and x.shape[-1] == 3:
            x = x @ np.array([[0.299], [0.587], [0.114]], np.float32)
        elif channels == 3 and x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        else:
            raise ValueError(f"image has {image.shape[-1]} channels; the model takes {channels}")
    if x.shape[:2] != (height, width):
        x = tf.image.resize(x, (height, width), method="bilinear").numpy()
    return x

