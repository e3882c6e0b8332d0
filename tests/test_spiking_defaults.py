"""The spiking defaults on the whole shipped sample (slow: about two minutes).

Judged as users would: the last step's CAM should look like the Keras model's (median
Pearson correlation over images >= 0.9) and classify as well (within 2 points).
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tests.conftest import run_cli


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation over the last axis."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


@pytest.mark.slow
def test_default_spiking_run_matches_keras_on_the_sample(tmp_path):
    out = tmp_path / "cams.zarr"
    assert run_cli("--output", str(out)) == 0
    ds = xr.open_zarr(out)
    assert ds.sizes["image"] == 300 and ds.sizes["timestep"] == 30
    assert (ds.status.values == 1).all()
    labels = ds.label.values
    predicted = ds.logits.isel(timestep=-1).values.argmax(-1)
    reference = ds.logits_reference.values.argmax(-1)
    correlation = pearson(
        ds.cam.isel(timestep=-1).values.reshape(300, -1),
        ds.cam_reference.values.reshape(300, -1),
    )
    assert np.median(correlation) >= 0.9
    assert abs(np.mean(predicted == labels) - np.mean(reference == labels)) <= 0.02
