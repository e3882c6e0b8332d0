"""Store templates of any size for a small made-up model head, without a model or data."""

from __future__ import annotations

import numpy as np
import xarray as xr

from transforms.model_head import CamHead
from transforms.statistics import sweep_thresholds
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
