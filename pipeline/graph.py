"""The Beam graph: files -> records -> decoded images -> chunks -> CAMs -> zarr.

Decoded records (small) are shuffled to their store chunk, so each chunk's outputs (large)
are computed and written whole by one worker. The store's template is written before the
pipeline runs (``transforms.store_setup``); workers only write regions (``status`` last, so a
chunk counts as done only once all of it is written).
"""

from __future__ import annotations

import apache_beam as beam
import xarray as xr
import xarray_beam as xbeam

import transforms.coders  # noqa: F401  (registers the coder of chunk Datasets)
from transforms.cam_chunks import ChunkJob, ComputeCamChunk, DecodeRecords, key_by_chunk
from transforms.chunk_writer import WriteChunks
from transforms.records import InputFile, read_records
from transforms.store import chunk_bounds


def build_pipeline(
    p: beam.Pipeline,
    files: tuple[InputFile, ...],
    job: ChunkJob,
    template: xr.Dataset,
    store: str,
    chunks: frozenset[int],
) -> beam.PCollection:
    """Add the computation of ``chunks`` (chunk indices) to ``p``; the store must already be
    set up from ``template``. Only files with records in those chunks are read."""
    ranges = [chunk_bounds(c, job.layout) for c in chunks]
    needed = tuple(
        f for f in files
        if f.n_records and any(f.first_index < stop and start < f.first_index + f.n_records for start, stop in ranges)
    )
    return (
        p
        | "ListFiles" >> beam.Create(needed)
        | "SpreadFiles" >> beam.Reshuffle()
        | "ReadRecords" >> beam.FlatMap(read_records)
        | "KeyByChunk" >> beam.Map(key_by_chunk, layout=job.layout)
        | "KeepChunksToDo" >> beam.Filter(lambda keyed: keyed[0] in chunks)
        | "DecodeRecords" >> beam.ParDo(DecodeRecords(job, template.sizes["class"]))
        | "GroupByChunk" >> beam.GroupByKey()
        | "ComputeCams" >> beam.ParDo(ComputeCamChunk(job, template)).with_output_types(
            tuple[xbeam.Key, xr.Dataset])  # sized by DatasetCoder, not pickled to be sized
        | "WriteChunks" >> beam.ParDo(WriteChunks(store, job.layout))
    )
