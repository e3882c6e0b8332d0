"""Store templates of any size, and the job of a run on them, for a small made-up model head,
without a model or data."""

from __future__ import annotations

import numpy as np
import xarray as xr

from transforms.cam_chunks import ChunkJob
from transforms.model_head import CamHead
from transforms.preprocess import Preprocessing
from transforms.records import ExampleDecoder
from transforms.spiking import SpikingSettings
from transforms.statistics import StatisticsSettings, sweep_thresholds
from transforms.store import FileRow, StoreLayout, build_template

HEAD = CamHead("features", (8, 8, 4), "dense", np.ones((4, 10), np.float32), np.zeros(10, np.float32), (32, 32, 3))


def template_of(n: int, steps: int = 30, per_file: int = 100) -> tuple[StoreLayout, xr.Dataset]:
    """The layout and template of ``n`` images in files of ``per_file`` records, 64 per chunk."""
    layout = StoreLayout(n_images=n, n_steps=steps, dt=0.001, max_boxes=2, images_per_chunk=64)
    files = [FileRow(f"/data/part-{i:05d}.tfrecord", per_file, "") for i in range(-(-n // per_file))]
    sources = [f.path for f in files for _ in range(per_file)][:n]
    template = build_template(layout, HEAD, [f"image-{i:07d}" for i in range(n)], sources, np.arange(n) % per_file,
                              [str(k) for k in range(10)], ("a", "b"), sweep_thresholds(), files,
                              {"dataset_files": [f.path for f in files]})
    return layout, template


def job_of(layout: StoreLayout) -> ChunkJob:
    """A run's job on ``layout`` with default settings (its model file is never opened)."""
    return ChunkJob("model.h5", SpikingSettings(), ExampleDecoder(), layout,
                    StatisticsSettings(size=HEAD.input_shape[:2]), Preprocessing())
