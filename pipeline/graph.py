"""The Beam graph: files -> records -> chunks -> CAMs -> zarr.

Records (small) are shuffled to their store chunk, so each chunk's outputs (large) are
computed and written whole by one worker. The store's template is written before the
pipeline runs (``xbeam.setup_zarr``); workers only write regions.
"""

from __future__ import annotations

import apache_beam as beam
import xarray as xr
import xarray_beam as xbeam

from transforms.cam_chunks import ChunkJob, ComputeCamChunk, key_by_chunk
from transforms.records import InputFile, read_records
from transforms.store import zarr_chunks


def build_pipeline(
    p: beam.Pipeline,
    files: tuple[InputFile, ...],
    job: ChunkJob,
    template: xr.Dataset,
    store: str,
) -> beam.PCollection:
    """Add the whole run to ``p``; the store must already be set up from ``template``."""
    return (
        p
        | "ListFiles" >> beam.Create(files)
        | "SpreadFiles" >> beam.Reshuffle()
        | "ReadRecords" >> beam.FlatMap(read_records)
        | "KeyByChunk" >> beam.Map(key_by_chunk, layout=job.layout)
        | "GroupByChunk" >> beam.GroupByKey()
        | "ComputeCams" >> beam.ParDo(ComputeCamChunk(job, template))
        | "WriteChunks"
        >> xbeam.ChunksToZarr(store, template, zarr_chunks(job.layout), needs_setup=False)
    )
