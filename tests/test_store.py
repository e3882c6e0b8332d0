"""The store's template (lazy, whatever the dataset's size); writing a chunk: all of its data
arrays, then ``status``, the chunk's commit marker."""

import tracemalloc

import numpy as np
import pytest
import xarray as xr
import xarray_beam as xbeam
import zarr
from apache_beam.internal import pickler

from tests.template_factory import job_of, template_of
from transforms.cam_chunks import ComputeCamChunk
from transforms.store import (
    CHUNKED_VARIABLES,
    StoreLayout,
    _chunk_file_codec,
    chunk_dataset,
    chunk_rows,
    chunk_template,
    empty_chunk,
    write_chunk,
)

LAYOUT = StoreLayout(n_images=6, n_steps=1, dt=0.001, max_boxes=1, images_per_chunk=4)
DTYPES = {"cam": "f4", "label": "i4", "status": "i1"}


def test_the_template_takes_no_memory_in_proportion_to_the_dataset():
    n, steps = 20_000, 30  # cam alone would be 20000 x 10 x 30 x 8 x 8 float32: 1.5 GB
    tracemalloc.start()
    _, template = template_of(n, steps)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert template["cam"].shape == (n, 10, steps, 8, 8) and template["cam"].dtype == np.float32
    assert peak < 50e6, f"building the template allocated {peak / 1e6:.0f} MB"


def test_a_chunk_assembled_from_the_chunk_template_is_that_of_the_whole_template():
    _, template = template_of(300)
    small = chunk_template(template)
    rows, n = np.array([0, 2, 3]), 5
    for name in CHUNKED_VARIABLES:
        shape = (len(rows),) + template.variables[name].shape[1:]
        values = np.ones(shape, template.variables[name].dtype)
        np.testing.assert_array_equal(chunk_rows(small, name, values, rows, n),
                                      chunk_rows(template, name, values, rows, n))
    arrays = empty_chunk(small, 64, 69, CHUNKED_VARIABLES)
    xr.testing.assert_identical(chunk_dataset(small, arrays), chunk_dataset(template, arrays))


def test_the_cam_dofn_pickles_to_the_same_size_whatever_the_datasets_size():
    """Beam pickles each DoFn into the pipeline (for Dataflow, into the job's request, which
    has a size limit): with the whole template, ComputeCamChunk grew by ~2 kB per 1000 images."""
    sizes = []
    for n in (300, 30_000):
        layout, template = template_of(n)
        sizes.append(len(pickler.dumps(ComputeCamChunk(job_of(layout), template))))
    assert sizes[1] < sizes[0] + 1000, sizes


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


@pytest.mark.parametrize("separator", ["/", "."])  # zarr 3's default keys; the pipeline's flat ones
def test_chunk_files_written_directly_are_what_zarr_writes(tmp_path, separator):
    keys = {"name": "default", "separator": separator}
    rng = np.random.default_rng(0)
    cam = rng.normal(size=(6, 3, 5)).astype("f4")
    cam[rng.random(cam.shape) < 0.5] = 0.0
    cam[1, 2] = np.nan
    data = xr.Dataset({"cam": (("image", "k", "x"), cam), "label": ("image", np.arange(6, dtype="i4")),
                       "status": ("image", np.ones(6, "i1"))})
    arrays = {}
    for name in ("direct", "zarr"):
        group = zarr.open_group(str(tmp_path / name), mode="w")
        group.create_array("cam", shape=cam.shape, chunks=(4, 3, 5), dtype="f4", fill_value=np.nan,
                           compressors=zarr.codecs.ZstdCodec(level=1), dimension_names=("image", "k", "x"),
                           chunk_key_encoding=keys)
        for var in ("label", "status"):
            group.create_array(var, shape=(6,), chunks=(4,), dtype=data[var].dtype, fill_value=0,
                               dimension_names=("image",), chunk_key_encoding=keys)
        arrays[name] = {var: group[var] for var in data.data_vars}
    for start, stop in ((0, 4), (4, 6)):
        write_chunk(xbeam.Key({"image": start}), data.isel(image=slice(start, stop)), arrays["direct"], LAYOUT)
        for var in data.data_vars:
            arrays["zarr"][var][start:stop] = data[var].values[start:stop]
    assert _chunk_file_codec(arrays["direct"]["cam"], (4, 3, 5)) is not None  # the first chunk: as files
    assert _chunk_file_codec(arrays["direct"]["cam"], (2, 3, 5)) is None  # the last, partial: through zarr
    def chunk_files(store):
        return sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and p.name != "zarr.json")

    files = chunk_files(tmp_path / "direct")
    assert len(files) == 6 and files == chunk_files(tmp_path / "zarr")  # and no partial file left
    assert (tmp_path / "direct" / "cam" / f"c{separator}1{separator}0{separator}0").is_file()
    for file in files:
        assert (tmp_path / "direct" / file).read_bytes() == (tmp_path / "zarr" / file).read_bytes(), file
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "direct", consolidated=False).compute(), data)
