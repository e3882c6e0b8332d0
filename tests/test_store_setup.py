"""Setting up a new store (``transforms.store_setup``) writes exactly the store that
``xarray_beam.setup_zarr`` writes from the same template: every file, byte for byte (the
metadata documents compared as JSON)."""

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import xarray as xr
import xarray_beam as xbeam
import zarr

from tests.template_factory import template_of
from transforms.store import zarr_chunks, zarr_encoding
from transforms.store_setup import setup_store


def store_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, object]:
    """Every file under ``root``: metadata documents parsed, chunks as bytes."""
    files = {}
    for path in fs.find(root):
        key = path[len(root.rstrip("/")):].lstrip("/")
        data = fs.cat_file(path)
        files[key] = json.loads(data) if key.endswith("zarr.json") else data
    return files


def local_files(root: Path) -> dict[str, object]:
    return store_files(fsspec.filesystem("file"), str(root))


def differences(expected: dict[str, object], actual: dict[str, object]) -> list[str]:
    missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    return ([f"missing {k}" for k in missing] + [f"extra {k}" for k in extra]
            + [f"differs {k}" for k in sorted(expected.keys() & actual.keys()) if expected[k] != actual[k]])


def with_attributes_of_every_kind(template: xr.Dataset) -> xr.Dataset:
    """The template with dataset and variable attributes of the kinds the pipeline writes
    (nested dicts, lists) and numpy values that JSON has to take as numbers and lists."""
    template = template.copy()
    template.attrs.update(dt=np.float64(0.001), n_steps=np.int64(30), dataset={"kind": "tfrecord", "path": "a/*"},
                          flags=np.array([1, 2, 3]), versions={"zarr": zarr.__version__})
    template["cam"].attrs["threshold"] = np.float32(0.25)
    return template


@pytest.mark.parametrize("n_images", [300, 200_000])  # 200k: zarr splits the eager coordinates into chunks
def test_the_store_is_the_one_xarray_beam_writes(tmp_path, n_images):
    layout, template = template_of(n_images)
    template = with_attributes_of_every_kind(template)
    chunks, encoding = zarr_chunks(layout), zarr_encoding(template)
    xbeam.setup_zarr(template, tmp_path / "reference.zarr", chunks, encoding=encoding, stage_locally=False)
    setup_store(template, str(tmp_path / "store.zarr"), chunks, encoding)

    reference, written = local_files(tmp_path / "reference.zarr"), local_files(tmp_path / "store.zarr")
    assert differences(reference, written) == []
    assert sum(not key.endswith("zarr.json") for key in written) >= 10  # coordinate values, Dense weights...
    if n_images == 200_000:
        assert written["record_index/zarr.json"]["chunk_grid"]["configuration"]["chunk_shape"][0] < n_images


def test_the_store_reads_back_as_the_template(tmp_path):
    layout, template = template_of(300)
    setup_store(template, str(tmp_path / "store.zarr"), zarr_chunks(layout), zarr_encoding(template))
    ds = xr.open_zarr(tmp_path / "store.zarr", chunks=None)
    for name, variable in template.variables.items():
        kinds = {ds[name].dtype.kind, variable.dtype.kind}
        assert ds[name].dims == variable.dims and (len(kinds) == 1 or kinds <= set("OT")), name
        if variable.chunks is None:  # eager: its values are in the store
            np.testing.assert_array_equal(ds[name].values.astype(variable.dtype), variable.values, err_msg=name)
    assert np.isnan(ds["cam"].isel(image=0).values).all() and (ds["status"].values == 0).all()
    assert (ds["label"].values == 0).all()  # zarr's default: the workers write -1 where there is no label
    assert ds.attrs == template.attrs


def test_a_store_at_an_fsspec_url_is_the_same_store(tmp_path):
    layout, template = template_of(300)
    chunks, encoding = zarr_chunks(layout), zarr_encoding(template)
    setup_store(template, str(tmp_path / "local.zarr"), chunks, encoding)
    setup_store(template, "memory://setup/store.zarr", chunks, encoding)
    try:
        remote = store_files(fsspec.filesystem("memory"), "/setup/store.zarr")
        assert differences(local_files(tmp_path / "local.zarr"), remote) == []
        assert xr.open_zarr("memory://setup/store.zarr", chunks=None)["image_id"].values[-1] == "image-0000299"
    finally:
        fsspec.filesystem("memory").rm("/setup", recursive=True)


def test_setting_up_over_an_old_store_leaves_none_of_it(tmp_path):
    store = tmp_path / "store.zarr"
    zarr.open_group(store, mode="w").create_array("stale", shape=(3,), dtype="i4")[:] = [1, 2, 3]
    layout, template = template_of(300)
    setup_store(template, str(store), zarr_chunks(layout), zarr_encoding(template))
    assert not (store / "stale").exists()
    assert "stale" not in xr.open_zarr(store, chunks=None).variables
