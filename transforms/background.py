"""Work a DoFn hands to a background thread, and stage timings that reach Beam's counters.

A worker's simulation keeps its main thread busy; CAMs, statistics and zarr writes can
run beside it in threads of their own (numpy, numba, zstd and file I/O release the GIL),
at the lowest CPU priority (``background_pool``).
``Unfinished`` holds the futures of that work and emits the results in order: from
``process`` as they finish (or as soon as more than ``limit`` are unfinished, which
bounds memory), the rest from ``finish_bundle``, so a bundle ends only when all of its
work has.

Beam records metrics only in the thread running the DoFn, so background work measures
its stages into a dict (``timed(name, into)``) and returns it with its result; ``Unfinished``
adds those to the counters when it emits the result.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

log = logging.getLogger(__name__)
METRICS_NAMESPACE = "cam_pipeline"
BACKGROUND_NICE = 19  # the lowest CPU priority


def _lower_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux, where nice is per thread);
    where that is refused, the thread runs at normal priority (slower, same results)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except OSError as err:
            log.info("background thread left at normal priority: %s", err)


def background_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads for work beside the simulation, at the lowest CPU
    priority: they take the cycles the engine leaves idle rather than the engine's own,
    and when they fall behind, the simulation waits for them (``Unfinished``) and leaves
    them the cores. Measured: +11% images/s in steady state (6 rounds, each faster)."""
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=_lower_priority)


@contextlib.contextmanager
def timed(name: str, into: dict[str, int] | None = None):
    """Add the block's wall time (ms) to the Beam counter ``cam_pipeline:<name>``, or to
    ``into[name]`` in a background thread."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = int((time.perf_counter() - start) * 1000)
        if into is None:
            Metrics.counter(METRICS_NAMESPACE, name).inc(elapsed)
        else:
            into[name] = into.get(name, 0) + elapsed


class Unfinished:
    """Futures of (result, {stage: ms}) in submission order, with the window of the element
    each came from."""

    def __init__(self, limit: int):
        self._limit = limit
        self._queue: collections.deque[tuple[Future, WindowedValue]] = collections.deque()

    def add(self, future: Future, timestamp, window) -> Iterator[Any]:
        """Hold ``future``; yield the results now due (call from ``process``)."""
        self._queue.append((future, WindowedValue(None, timestamp, (window,))))
        while self._queue and (self._queue[0][0].done() or len(self._queue) > self._limit):
            yield self._result(self._queue.popleft()[0])

    def drain(self) -> Iterator[WindowedValue]:
        """Wait for everything held; yield the results as windowed values (``finish_bundle``)."""
        while self._queue:
            future, where = self._queue.popleft()
            yield where.with_value(self._result(future))

    @staticmethod
    def _result(future: Future) -> Any:
        """The result (raising what the background thread raised); counts its stage times."""
        result, timings = future.result()
        for name, elapsed in timings.items():
            Metrics.counter(METRICS_NAMESPACE, name).inc(elapsed)
        return result
