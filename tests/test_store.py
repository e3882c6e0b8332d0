"""The store's template (lazy, whatever the dataset's size); writing a chunk: all of its data
arrays, then ``status``, the chunk's commit marker."""

import tracemalloc

import numpy as np
import pytest
import xarray as xr
import xarray_beam as xbeam
import zarr

from transforms.model_head import CamHead
from transforms.statistics import sweep_thresholds
from transforms.store import FileRow, StoreLayout, build_template, write_chunk

LAYOUT = StoreLayout(n_images=6, n_steps=1, dt=0.001, max_boxes=1, images_per_chunk=4)
DTYPES = {"cam": "f4", "label": "i4", "status": "i1"}


def test_the_template_takes_no_memory_in_proportion_to_the_dataset():
    n, steps = 20_000, 30  # cam alone would be 20000 x 10 x 30 x 8 x 8 float32: 1.5 GB
    head = CamHead("features", (8, 8, 4), "dense", np.ones((4, 10), np.float32), np.zeros(10, np.float32),
                   (32, 32, 3))
    layout = StoreLayout(n_images=n, n_steps=steps, dt=0.001, max_boxes=2, images_per_chunk=64)
    ids = [f"f:{i}" for i in range(n)]
    tracemalloc.start()
    template = build_template(layout, head, ids, ["f"] * n, np.arange(n), [str(k) for k in range(10)],
                              ("a", "b"), sweep_thresholds(), [FileRow("f", n, "")], {})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert template["cam"].shape == (n, 10, steps, 8, 8) and template["cam"].dtype == np.float32
    assert peak < 50e6, f"building the template allocated {peak / 1e6:.0f} MB"


def make_store(path) -> dict[str, zarr.Array]:
    group = zarr.open_group(str(path), mode="w")
    for name, dtype in DTYPES.items():
        group.create_array(name, shape=(LAYOUT.n_images,), chunks=(LAYOUT.images_per_chunk,), dtype=dtype,
                           fill_value=0, dimension_names=("image",))
    return {name: group[name] for name in DTYPES}


def chunk(start: int, stop: int) -> xr.Dataset:
    return xr.Dataset({
        "cam": ("image", np.arange(start, stop, dtype="f4") + 0.5),
        "label": ("image", np.arange(start, stop, dtype="i4") + 10),
        "status": ("image", np.ones(stop - start, "i1")),
    })


def test_a_chunk_lands_in_its_region_of_every_array(tmp_path):
    arrays = make_store(tmp_path / "s.zarr")
    assert write_chunk(xbeam.Key({"image": 4}), chunk(4, 6), arrays, LAYOUT) == 4
    assert write_chunk(xbeam.Key({"image": 0}), chunk(0, 4), arrays, LAYOUT) == 0
    stored = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    xr.testing.assert_equal(stored.compute(), chunk(0, 6))


def test_status_stays_unwritten_when_a_data_array_fails(tmp_path):
    arrays = make_store(tmp_path / "s.zarr")
    arrays["label"] = zarr.open_array(str(tmp_path / "s.zarr" / "label"), mode="r")  # writes fail
    with pytest.raises(ValueError):
        write_chunk(xbeam.Key({"image": 0}), chunk(0, 4), arrays, LAYOUT)
    assert (arrays["status"][:] == 0).all(), "a chunk whose data failed to write must stay 'never written'"


def test_a_chunk_off_the_zarr_chunk_grid_is_refused(tmp_path):
    arrays = make_store(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="not aligned"):
        write_chunk(xbeam.Key({"image": 2}), chunk(2, 6), arrays, LAYOUT)
