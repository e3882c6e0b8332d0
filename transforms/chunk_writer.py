"""Beam DoFn: write each finished chunk into the store, in a background thread.

Writing a chunk (~35 arrays, zstd) takes ~0.5 ms of CPU per image (zstd on ``cam``:
~0.3 ms; see ``transforms.store.write_chunk``); in the DoFn's own thread it would hold up
the next chunk's simulation, so it runs in one writer thread per process.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import xarray as xr
import xarray_beam as xbeam
import zarr
from apache_beam.metrics import Metrics

from transforms.background import METRICS_NAMESPACE, Unfinished, background_pool, timed
from transforms.store import StoreLayout, open_chunk_arrays, write_chunk

_writer: ThreadPoolExecutor | None = None
_writer_lock = threading.Lock()


def writer() -> ThreadPoolExecutor:
    """This process's writer thread (one, shared by all DoFn instances)."""
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = background_pool(1, "zarr-writer")
        return _writer


def _write(key: xbeam.Key, chunk: xr.Dataset, arrays: dict[str, zarr.Array],
           layout: StoreLayout) -> tuple[tuple, dict[str, int]]:
    """((the chunk's first image index, when it was written: ms since the epoch), timings)."""
    timings: dict[str, int] = {}
    with timed("write_ms", timings):
        start = write_chunk(key, chunk, arrays, layout)
    return (start, int(time.time() * 1000)), timings


def _written(output: tuple[int, int]) -> int:
    """The chunk's start index; its write time goes to the distribution
    ``chunk_written_at_ms`` (whose min and max give the steady-state throughput)."""
    start, written_at = output
    Metrics.distribution(METRICS_NAMESPACE, "chunk_written_at_ms").update(written_at)
    return start


class WriteChunks(beam.DoFn):
    """(xbeam.Key, chunk Dataset) -> the chunk's first image index, once it is written.

    At most ``MAX_UNFINISHED`` chunks per DoFn wait for the writer, so memory stays flat.
    """

    MAX_UNFINISHED = 2

    def __init__(self, store: str, layout: StoreLayout):
        self._store = store
        self._layout = layout

    def setup(self) -> None:
        self._arrays = open_chunk_arrays(self._store)

    def start_bundle(self) -> None:
        self._unfinished = Unfinished(self.MAX_UNFINISHED)

    def process(self, keyed: tuple[xbeam.Key, xr.Dataset],
                timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        future = writer().submit(_write, *keyed, self._arrays, self._layout)
        for output in self._unfinished.add(future, timestamp, window):
            yield _written(output)

    def finish_bundle(self):
        for windowed in self._unfinished.drain():
            yield windowed.with_value(_written(windowed.value))
