"""Beam DoFn: one store chunk's decoded records in, that whole chunk's CAMs out.

The networks (the spiking engine, fast or NengoDL's, and the Keras reference) are built
once per worker process (``beam.utils.shared.Shared``: DoFn instances on several threads
of one process share them, one at a time) and reused for every chunk. Records that failed
to read or decode (``DecodeRecords``), or that do not fit the model, are marked
``status == 2`` with the reason; the rest are simulated together.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable

import apache_beam as beam
import numpy as np
import xarray as xr
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared
from threadpoolctl import threadpool_limits

from transforms.background import METRICS_NAMESPACE, Unfinished, background_pool, timed
from transforms.buffers import BufferPool
from transforms.cam import class_activation_maps, step_class_activation_maps
from transforms.fast_engine import FastSpikingNetwork
from transforms.gc_tuning import freeze_startup_objects
from transforms.model_head import CamHead, find_cam_head, load_keras_model
from transforms.nengo_shim import tf
from transforms.preprocess import Preprocessing
from transforms.records import (
    Example,
    ExampleDecoder,
    TfdsDecoder,
    decode_failure,
    decode_record,
)
from transforms.spiking import ReferenceNetwork, SpikingNetwork, SpikingSettings
from transforms.statistics import StatisticsSettings, image_statistics_threaded
from transforms.store import (
    CHUNKED_VARIABLES,
    INPUT_VARIABLES,
    STATUS_DONE,
    STATUS_FAILED,
    StoreLayout,
    chunk_bounds,
    chunk_dataset,
    chunk_key,
    chunk_rows,
    chunk_template,
    empty_chunk,
)
from transforms.tfrecord_io import BadRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs, picklable: the model file, how to simulate, decode and
    summarize."""

    model_path: str
    settings: SpikingSettings
    decoder: TfdsDecoder | ExampleDecoder
    layout: StoreLayout
    statistics: StatisticsSettings
    preprocessing: Preprocessing
    threads_per_worker: int | None = None  # TensorFlow threads in each worker; None: TF's default


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: less than the machine's under
    ``taskset`` or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def limit_threads(threads: int | None) -> None:
    """Give this process's TensorFlow ``threads`` threads (e.g. cores / worker processes),
    so that worker processes sharing a machine do not fight over its cores. Only before the
    process's first TensorFlow op (setting the same counts again is a no-op); later, a
    warning says that the counts stay TensorFlow's."""
    if threads is None:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as err:  # TensorFlow already running in this process
        log.warning("TensorFlow threads left at %d, not set to %d: %s",
                    tf.config.threading.get_intra_op_parallelism_threads(), threads, err)


class Networks:
    """The spiking and reference networks of one job, and a lock to use them one at a time."""

    builds = 0  # how many were built in this process (tests check that it is one per run)

    def __init__(self, job: ChunkJob):
        limit_threads(job.threads_per_worker)
        # The CAM matmuls run beside the engine; BLAS threads of their own would only
        # contend with it for the cores (measured: cam_ms halves with one).
        threadpool_limits(1, user_api="blas")
        model = load_keras_model(job.model_path)
        self.head: CamHead = find_cam_head(model, job.model_path)
        threads = job.threads_per_worker or available_cores()
        if job.settings.engine == "fast":
            self.spiking = FastSpikingNetwork(model, self.head, job.settings, concurrent_batches=min(2, threads))
        else:
            self.spiking = SpikingNetwork(model, self.head, job.settings)
        self.reference = ReferenceNetwork(model, self.head)
        # One chunk's features (126 MB for the shipped model) reused chunk after chunk: two
        # at once, the one simulating and the one whose CAMs are being computed.
        chunk_features = (job.layout.images_per_chunk, job.settings.n_steps) + self.head.feature_shape
        self.feature_buffers = BufferPool(chunk_features)
        self.lock = threading.Lock()
        self.statistics_threads = threads
        self.statistics_pool = background_pool(self.statistics_threads, "statistics") if self.statistics_threads > 1 else None
        self.finisher = background_pool(1, "finisher")  # CAMs and statistics of one chunk while the next simulates
        freeze_startup_objects()  # a worker process's first build: its imports and these networks
        Networks.builds += 1


class ComputeCamChunk(beam.DoFn):
    """(chunk index, [(image index, Example or BadRecord), ...]) -> (xbeam.Key, chunk Dataset).

    The simulation runs in ``process``; the chunk's CAMs and statistics are finished in a
    background thread while the next chunk simulates (using the cycles the engine leaves
    idle), and are emitted by a later ``process`` call or by ``finish_bundle``. At most
    ``MAX_UNFINISHED`` chunks per DoFn are held, so memory does not grow with the data.
    """

    MAX_UNFINISHED = 1

    def __init__(self, job: ChunkJob, template: xr.Dataset):
        self._job = job
        self._template = chunk_template(template)  # small whatever the dataset's size
        self._shared = Shared()

    def setup(self) -> None:
        self._networks: Networks = self._shared.acquire(
            lambda: Networks(self._job), tag=repr(self._job)
        )
        self._head = self._networks.head

    def start_bundle(self) -> None:
        self._unfinished = Unfinished(self.MAX_UNFINISHED)

    def process(self, element: tuple[int, Iterable[tuple[int, Example | BadRecord]]],
                timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        chunk_index, arrays, images, rows = self._assemble(element)
        buffer = self._networks.feature_buffers.take() if images else None
        outputs = self._simulate(images, buffer) if images else None
        future = self._networks.finisher.submit(self._finish, chunk_index, arrays, outputs, rows, buffer)
        yield from self._unfinished.add(future, timestamp, window)

    def finish_bundle(self):
        yield from self._unfinished.drain()

    def _assemble(self, element) -> tuple[int, dict, list[np.ndarray], np.ndarray]:
        """The chunk's labels, boxes, status and errors (``INPUT_VARIABLES``); the images that
        fit the model, and their rows in the chunk."""
        chunk_index, examples = element
        layout = self._job.layout
        start, stop = chunk_bounds(chunk_index, layout)
        arrays = empty_chunk(self._template, start, stop, INPUT_VARIABLES)  # the rest in _finish
        rows, images = [], []
        for index, example in sorted(examples, key=lambda r: r[0]):
            row = index - start
            failure = example.reason if isinstance(example, BadRecord) else ""
            if not failure:
                try:
                    image = self._job.preprocessing.apply(example.image, self._head.input_shape)
                except Exception as err:  # noqa: BLE001 - every failure is recorded per image
                    failure = decode_failure(err)
            if failure:
                arrays["status"][row] = STATUS_FAILED
                arrays["error"][row] = failure
                continue
            arrays["label"][row] = example.label
            arrays["boxes"][row, : len(example.boxes)] = example.boxes
            rows.append(row)
            images.append(image)
        Metrics.counter(METRICS_NAMESPACE, "images").inc(stop - start)
        return chunk_index, arrays, images, np.asarray(rows, np.int64)

    def _simulate(self, images: list[np.ndarray], buffer: np.ndarray) -> tuple[np.ndarray, ...]:
        """Spiking features (into ``buffer``'s first rows), logits and rates, then the
        reference's features and logits."""
        batch = np.stack(images)
        with self._networks.lock:
            with timed("engine_ms"):
                spiking = self._networks.spiking.run(batch, buffer[: len(batch)])
            with timed("reference_ms"):
                reference = self._networks.reference.run(batch)
        return spiking + reference

    def _finish(self, chunk_index: int, arrays: dict, outputs: tuple | None, rows: np.ndarray,
                buffer: np.ndarray | None):
        """The chunk's other variables (CAMs and statistics at ``rows``, fill values elsewhere)
        beside ``arrays``: ((key, chunk Dataset), {stage: ms}). Gives the features' ``buffer``
        back to the pool."""
        timings: dict[str, int] = {}
        try:
            computed = (self._compute(outputs, arrays["label"][rows], arrays["boxes"][rows], timings)
                        if len(rows) else {})
        finally:
            if buffer is not None:
                self._networks.feature_buffers.give(buffer)
        arrays["status"][rows] = STATUS_DONE
        n = len(arrays["status"])
        for name in CHUNKED_VARIABLES:
            if name not in arrays:
                arrays[name] = chunk_rows(self._template, name, computed.get(name), rows, n)
        return (chunk_key(chunk_index, self._job.layout), chunk_dataset(self._template, arrays)), timings

    def _compute(self, outputs: tuple[np.ndarray, ...], labels: np.ndarray, boxes: np.ndarray,
                 timings: dict) -> dict[str, np.ndarray]:
        """CAMs, outputs and statistics of the simulated images, keyed by store variable."""
        features, logits, rates, reference_features, reference_logits = outputs
        weights = self._head.weights
        with timed("cam_ms", timings):
            cam = step_class_activation_maps(features, weights)
            cam_reference = class_activation_maps(reference_features, weights)
        with timed("statistics_ms", timings):
            statistics = image_statistics_threaded(
                cam, cam_reference, logits, reference_logits, labels, boxes,
                settings=self._job.statistics, pool=self._networks.statistics_pool,
                threads=self._networks.statistics_threads,
            )
        return statistics | {"cam": cam, "logits": logits, "cam_reference": cam_reference,
                             "logits_reference": reference_logits, "firing_rate": np.swapaxes(rates, 1, 2)}


def key_by_chunk(record: tuple[int, bytes | BadRecord], layout: StoreLayout) -> tuple[int, tuple]:
    """(image index, record) -> (chunk index, (image index, record))."""
    return record[0] // layout.images_per_chunk, record


class DecodeRecords(beam.DoFn):
    """(chunk index, (image index, record)) -> (chunk index, (image index, Example or BadRecord)).

    Decoding runs here, before the records are grouped by chunk, in the reading stage's
    workers: in ``ComputeCamChunk`` it held up every chunk's simulation (~1.4 ms per image
    while the background threads ran beside it, ~9% of a run). Its time goes to the
    counter ``decode_ms`` once per bundle (a record takes well under a millisecond)."""

    def __init__(self, job: ChunkJob, n_classes: int):
        self._job = job
        self._n_classes = n_classes

    def setup(self) -> None:
        # Decoding is a worker's first TensorFlow op, which fixes its thread counts: set
        # them here, or ComputeCamChunk's setup comes too late to.
        limit_threads(self._job.threads_per_worker)

    def start_bundle(self) -> None:
        self._seconds = 0.0

    def process(self, keyed: tuple[int, tuple[int, bytes | BadRecord]]):
        chunk_index, record = keyed
        start = time.perf_counter()
        decoded = decode_record(record, self._job.decoder, self._n_classes, self._job.layout.max_boxes)
        self._seconds += time.perf_counter() - start
        yield chunk_index, decoded

    def finish_bundle(self) -> None:
        Metrics.counter(METRICS_NAMESPACE, "decode_ms").inc(int(self._seconds * 1000))
