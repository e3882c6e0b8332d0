"""Beam DoFn: write each finished chunk into the store, in a background thread.

Writing a chunk (~35 arrays, zstd) takes ~2 ms per image; in the DoFn's own thread it
would hold up the next chunk's simulation, so it runs in one writer thread per process.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import xarray as xr
import xarray_beam as xbeam

from transforms.background import Unfinished, timed
from transforms.store import StoreLayout, write_chunk

_writer: ThreadPoolExecutor | None = None
_writer_lock = threading.Lock()


def writer() -> ThreadPoolExecutor:
    """This process's writer thread (one, shared by all DoFn instances)."""
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = ThreadPoolExecutor(1, thread_name_prefix="zarr-writer")
        return _writer


def _write(key: xbeam.Key, chunk: xr.Dataset, store: str, layout: StoreLayout) -> tuple[int, dict[str, int]]:
    timings: dict[str, int] = {}
    with timed("write_ms", timings):
        start = write_chunk(key, chunk, store, layout)
    return start, timings


class WriteChunks(beam.DoFn):
    """(xbeam.Key, chunk Dataset) -> the chunk's first image index, once it is written.

    At most ``MAX_UNFINISHED`` chunks per DoFn wait for the writer, so memory stays flat.
    """

    MAX_UNFINISHED = 2

    def __init__(self, store: str, layout: StoreLayout):
        self._store = store
        self._layout = layout

    def start_bundle(self) -> None:
        self._unfinished = Unfinished(self.MAX_UNFINISHED)

    def process(self, keyed: tuple[xbeam.Key, xr.Dataset],
                timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        future = writer().submit(_write, *keyed, self._store, self._layout)
        yield from self._unfinished.add(future, timestamp, window)

    def finish_bundle(self):
        yield from self._unfinished.drain()
