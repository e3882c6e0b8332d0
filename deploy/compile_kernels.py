"""Compile the numba kernels into the worker image's cache, so that each worker does not
spend ~10 s compiling them: run by deploy/Dockerfile after installing the package."""

import numpy as np

import transforms.nengo_shim  # noqa: F401  (before TensorFlow)
from pipeline.sample import SAMPLE_MODEL
from transforms.fast_engine import FastSpikingNetwork
from transforms.model_head import find_cam_head, load_keras_model
from transforms.spiking import SpikingSettings
from transforms.statistics import StatisticsSettings, image_statistics

cam, logits = np.ones((1, 2, 3, 4, 4), np.float32), np.ones((1, 3, 2), np.float32)
image_statistics(cam, cam[:, :, 0], logits, logits[:, 0], np.array([1]), np.full((1, 1, 4), 0.5, np.float32),
                 StatisticsSettings(size=(8, 8)))
model = load_keras_model(str(SAMPLE_MODEL))
FastSpikingNetwork(model, find_cam_head(model), SpikingSettings(n_steps=2, batch_size=1)).run(
    np.zeros((1,) + model.input_shape[1:], np.float32))
