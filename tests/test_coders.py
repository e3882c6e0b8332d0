"""Chunks pass between the pipeline's transforms with a coder that sizes them cheaply."""

from __future__ import annotations

from unittest import mock

import apache_beam as beam
import numpy as np
import xarray as xr
import xarray_beam as xbeam

from pipeline.graph import build_pipeline
from tests.template_factory import job_of, template_of
from transforms.coders import DatasetCoder


def test_chunks_leave_compute_cams_with_a_coder_that_sizes_them_without_encoding():
    layout, template = template_of(4, steps=2)
    job = job_of(layout)
    pipeline = beam.Pipeline()
    build_pipeline(pipeline, (), job, template, "store.zarr", frozenset({0}))
    (computed,) = [t for t in pipeline.transforms_stack[0].parts if t.full_label == "ComputeCams"]
    element_type = computed.outputs[None].element_type
    assert isinstance(beam.coders.registry.get_coder(element_type).coders()[1], DatasetCoder)

    chunk = (xbeam.Key({"image": 0}), xr.Dataset({"cam": ("image", np.arange(1000, dtype="f4"))}))
    with mock.patch.object(DatasetCoder, "encode", side_effect=AssertionError("encoded to estimate its size")):
        size = beam.coders.registry.get_coder(element_type).estimate_size(chunk)
    assert 4000 <= size < 4200  # the cam's 4000 bytes and the key's few
    coder = beam.coders.registry.get_coder(element_type)
    key, decoded = coder.decode(coder.encode(chunk))
    assert key == chunk[0]
    xr.testing.assert_identical(decoded, chunk[1])
