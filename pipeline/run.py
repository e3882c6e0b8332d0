"""``cam-pipeline run``: check the request, write the store's template, run Beam, summarize.

A new store is set up from the template before any worker starts. ``--resume`` reopens an
existing store made with the same request and computes only the chunks not yet done
(a chunk counts as done once its ``status`` is written, which is last).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time

import apache_beam as beam
import numpy as np
import xarray as xr
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.graph import build_pipeline
from transforms.background import METRICS_NAMESPACE
from transforms.cam_chunks import ChunkJob, available_cores, limit_threads
from transforms.fast_engine import effective_settings
from transforms.gc_tuning import freeze_startup_objects
from transforms.model_head import CamHead, find_cam_head, load_keras_model
from transforms.preprocess import Preprocessing
from transforms.records import InputDataset, InputError, limit_files, open_input
from transforms.spiking import ConvertedNetwork, SpikingSettings, convert
from transforms.statistics import StatisticsSettings
from transforms.store import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_NEVER_WRITTEN,
    FileRow,
    StoreLayout,
    build_template,
    chunk_size_for,
    zarr_chunks,
    zarr_encoding,
)
from transforms.store_setup import setup_store
from transforms.summary import write_summary

log = logging.getLogger(__name__)

PACKAGES = ("tensorflow", "tf-keras", "nengo", "nengo-dl", "apache-beam", "zarr", "xarray",
            "xarray-beam", "numpy", "tensorflow-datasets")


class RequestError(ValueError):
    """The run request is invalid; raised before any work is done."""


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """A ``run`` request (see ``pipeline.cli`` for the options)."""

    input: tuple[str, ...]
    split: str
    model: str
    output: str
    settings: SpikingSettings
    preprocessing: Preprocessing = Preprocessing()
    feature_keys: tuple[tuple[str, str], ...] = ()  # ("image" | "label" | "bbox", key)
    raw_shape: tuple[int, int, int] | None = None
    limit: int | None = None
    max_boxes: int = 8
    images_per_chunk: int | None = None
    cam_threshold: float = 0.2
    overwrite: bool = False
    resume: bool = False
    worker_threads: int | None = None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in PACKAGES}


def run_attrs(request: RunRequest, head: CamHead, dataset: InputDataset, layout: StoreLayout) -> dict:
    """The store's attributes: everything needed to know how it was made.

    ``request_fingerprint`` hashes what determines the store's contents; ``--resume``
    only continues a store whose fingerprint matches the new request's.
    """
    s = request.settings
    attrs = {
        "title": "Per-timestep class activation maps of a spiking (NengoDL) CNN",
        "model_file": os.path.abspath(request.model),
        "model_sha256": _sha256(request.model),
        "feature_layer": head.feature_layer,
        "dense_layer": head.dense_layer,
        "engine": s.engine,
        "neuron": s.neuron,
        "n_steps": s.n_steps,
        "dt": s.dt,
        "synapse": "none" if s.synapse is None else s.synapse,
        "probe_synapse": "none" if s.probe_synapse is None else s.probe_synapse,
        "scale_firing_rates": s.scale_firing_rates,
        "batch_size": s.batch_size,
        "cam_threshold": request.cam_threshold,
        "cam_upsampling": "bilinear, half-pixel centres (as tf.image.resize), to the model input size",
        "iou_localized": 0.5,
        "dataset": {k: str(v) for k, v in dataset.description.items()},
        "dataset_files": [f.path for f in dataset.files],
        "n_images": layout.n_images,
        "max_boxes": layout.max_boxes,
        "images_per_chunk": layout.images_per_chunk,
        "limit": "none" if request.limit is None else request.limit,
        "preprocessing": request.preprocessing.describe(),
        "package_versions": _versions(),
    }
    # batch_size does not change any result (tests check it), so it may differ on resume.
    content = {k: v for k, v in attrs.items() if k not in ("batch_size", "package_versions")}
    content["files"] = [dataclasses.astuple(f) for f in dataset.files]
    attrs["request_fingerprint"] = hashlib.sha256(
        json.dumps(content, sort_keys=True, default=str).encode()
    ).hexdigest()
    return attrs


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    dataset: InputDataset
    job: ChunkJob
    template: xr.Dataset


def prepare(request: RunRequest) -> PreparedRun:
    """Check the request, list the input and build the template; RequestError before any work."""
    exists = os.path.exists(request.output)
    if request.overwrite and request.resume:
        raise RequestError("--overwrite and --resume exclude each other")
    if exists and not (request.overwrite or request.resume):
        raise RequestError(f"{request.output}: already exists; pass --overwrite to replace it "
                           "or --resume to finish it")
    if request.resume and not exists:
        raise RequestError(f"{request.output}: nothing to resume (no such store)")
    if not os.path.isfile(request.model):
        raise RequestError(f"{request.model}: no such model file")
    if not 0 < request.cam_threshold <= 1:
        raise RequestError(f"--cam-threshold must be in (0, 1], got {request.cam_threshold}")
    try:
        model = load_keras_model(request.model)
        head = find_cam_head(model, request.model)
        neuron_layers = _converted(model, head, request).neuron_layers
        request = dataclasses.replace(
            request, settings=effective_settings(model, head, request.settings, neuron_layers)
        )
        dataset = open_input(list(request.input), request.split, dict(request.feature_keys), request.raw_shape)
    except (InputError, ValueError) as err:
        raise RequestError(str(err)) from err
    if request.limit is not None:
        dataset = dataclasses.replace(dataset, files=limit_files(dataset.files, request.limit))
    for f in dataset.files:
        if f.error:
            log.warning("%s: %s", f.path, f.error)
    if dataset.n_records == 0:
        raise RequestError(f"{' '.join(request.input)}: no records to process")
    class_names = list(dataset.class_names or [str(k) for k in range(head.n_classes)])
    if len(class_names) != head.n_classes:
        raise RequestError(
            f"{' '.join(request.input)} has {len(class_names)} label names but the model's Dense "
            f"layer {head.dense_layer!r} has {head.n_classes} outputs"
        )
    s = request.settings
    layout = StoreLayout(
        n_images=dataset.n_records,
        n_steps=s.n_steps,
        dt=s.dt,
        max_boxes=request.max_boxes,
        images_per_chunk=(request.images_per_chunk or (_stored_chunk_size(request.output) if request.resume else None)
                          or chunk_size_for(head, s.n_steps, s.batch_size)),
    )
    statistics = StatisticsSettings(size=head.input_shape[:2], threshold=request.cam_threshold)
    ids, files, records = dataset.record_table()
    template = build_template(
        layout, head, ids, files, records, class_names, neuron_layers, statistics.thresholds,
        [FileRow(f.path, f.n_records, f.error) for f in dataset.files],
        run_attrs(request, head, dataset, layout),
    )
    job = ChunkJob(os.path.abspath(request.model), s, dataset.decoder, layout, statistics,
                   request.preprocessing, request.worker_threads)
    return PreparedRun(dataset, job, template)


def _converted(model, head: CamHead, request: RunRequest) -> ConvertedNetwork:
    """The model converted with NengoDL; RequestError naming the model file where the
    converter fails (it raises errors of many types, whose messages name no file, and for
    a layer used twice not the layer either)."""
    shared = [layer.name for layer in model.layers if len(layer.inbound_nodes) > 1]
    if shared:
        raise RequestError(f"{request.model}: NengoDL's converter cannot convert a layer used more than once: "
                           f"{', '.join(repr(name) for name in shared)}")
    try:
        return convert(model, head, request.settings)
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise RequestError(f"{request.model}: NengoDL's converter cannot convert this model "
                           f"({type(err).__name__}: {err})") from err


def _stored_chunk_size(store: str) -> int | None:
    """The chunk size of the store being resumed: its default followed its batch size, which
    a resumed run may change."""
    size = xr.open_zarr(store, chunks=None).attrs.get("images_per_chunk")
    return None if size is None else int(size)


def chunks_to_do(store: str, template: xr.Dataset, layout: StoreLayout) -> frozenset[int]:
    """Chunks of an existing store with an image never written; RequestError if the store
    was made by a different request."""
    existing = xr.open_zarr(store)
    old, new = existing.attrs.get("request_fingerprint"), template.attrs["request_fingerprint"]
    if old != new:
        differing = sorted(
            k for k in set(existing.attrs) | set(template.attrs)
            if k not in ("request_fingerprint", "package_versions", "batch_size")
            and existing.attrs.get(k) != template.attrs.get(k)
        )
        raise RequestError(
            f"{store}: made by a different request, cannot resume it "
            f"(differs in: {', '.join(differing) or 'the input files'}); use --overwrite"
        )
    status = existing["status"].values
    return frozenset(int(i) // layout.images_per_chunk for i in np.flatnonzero(status == STATUS_NEVER_WRITTEN))


def beam_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options from the pass-through arguments; local default: FnApiRunner (no Prism
    download, which fails offline)."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=FnApiRunner")
    return PipelineOptions(args)


def worker_threads(beam_args: list[str]) -> int | None:
    """TensorFlow threads per worker for local multi-process runs: the cores shared out
    among ``--direct_num_workers`` processes; None (TensorFlow's default) otherwise."""
    options = beam_options(beam_args).get_all_options()
    workers = options.get("direct_num_workers") or 1
    if options.get("direct_running_mode") != "multi_processing" or workers <= 1:
        return None
    return max(1, available_cores() // workers)


def worker_in_this_process(beam_args: list[str]) -> bool:
    """Whether the pipeline's worker runs in this process: the local FnApiRunner, in memory
    or on threads (not with ``--direct_running_mode=multi_processing``, nor on a service)."""
    options = beam_options(beam_args).get_all_options()
    return (str(options.get("runner")).endswith("FnApiRunner")
            and options.get("direct_running_mode") in (None, "in_memory", "multi_threading"))


def execute(request: RunRequest, beam_args: list[str], metrics: dict | None = None) -> xr.Dataset:
    """Run the whole job (or what a resumed one lacks); return the store opened with xarray
    (lazily, without dask: building dask graphs for its ~75 arrays cost up to 0.3 s).

    metrics: if given, filled with the run's Beam counters (``cam_pipeline`` namespace:
    images, engine_ms, reference_ms, cam_ms, statistics_ms, write_ms), the first and last
    time a chunk was written (chunk_written_at_ms_min, _max: ms since the epoch) and the
    launcher's own timings (prepare_ms, pipeline_ms, summary_ms).
    """
    started = time.perf_counter()
    freeze_startup_objects()
    if request.worker_threads is None:
        request = dataclasses.replace(request, worker_threads=worker_threads(beam_args))
    if worker_in_this_process(beam_args):  # before prepare's first TensorFlow op, after which they are fixed
        limit_threads(request.worker_threads)
    run = prepare(request)
    prepared = time.perf_counter()
    layout = run.job.layout
    n_chunks = -(-layout.n_images // layout.images_per_chunk)
    if request.resume:
        chunks = chunks_to_do(request.output, run.template, layout)
        log.info("resuming %s: %d of %d chunks to compute", request.output, len(chunks), n_chunks)
    else:
        if os.path.exists(request.output):
            shutil.rmtree(request.output)
        setup_store(run.template, str(request.output), zarr_chunks(layout), zarr_encoding(run.template))
        chunks = frozenset(range(n_chunks))
        log.info("store %s set up for %d images in %d chunks", request.output, layout.n_images, n_chunks)
    counters = {}
    if chunks:
        p = beam.Pipeline(options=beam_options(beam_args))
        build_pipeline(p, run.dataset.files, run.job, run.template, request.output, chunks)
        result = p.run()
        result.wait_until_finish()
        query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
        for counter in query["counters"]:
            counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + counter.committed
        for distribution in query["distributions"]:
            name, value = distribution.key.metric.name, distribution.committed
            counters[f"{name}_min"] = min(counters.get(f"{name}_min", value.min), value.min)
            counters[f"{name}_max"] = max(counters.get(f"{name}_max", value.max), value.max)
    ran = time.perf_counter()
    write_summary(request.output)
    if metrics is not None:
        metrics.update(counters)
        metrics.update(prepare_ms=1000 * (prepared - started), pipeline_ms=1000 * (ran - prepared),
                       summary_ms=1000 * (time.perf_counter() - ran))
    return xr.open_zarr(request.output, chunks=None)


def summary(ds: xr.Dataset, store: str) -> str:
    """A few lines for the terminal: counts, accuracies, where the store is."""
    status = ds["status"].values
    done = status == STATUS_DONE
    labelled = done & (ds["label"].values >= 0)
    lines = [
        f"images: {status.size} ({done.sum()} done, {(status == STATUS_FAILED).sum()} failed, "
        f"{(status == STATUS_NEVER_WRITTEN).sum()} never written)",
    ]
    if (status == STATUS_FAILED).any():
        lines.append(f"failures: see {store}: ds.error.where(ds.status == 2, drop=True)")
    bad_files = [(p, e) for p, e in zip(ds["file_path"].values, ds["file_error"].values) if e]
    lines += [f"file problem: {p}: {e}" for p, e in bad_files]
    if labelled.any():
        labels = ds["label"].values[labelled]
        spiking = ds["logits"].isel(timestep=-1).values[labelled].argmax(-1)
        reference = ds["logits_reference"].values[labelled].argmax(-1)
        lines.append(
            f"accuracy: spiking at the last step {np.mean(spiking == labels):.3f}, "
            f"Keras model {np.mean(reference == labels):.3f} ({labelled.sum()} labelled images)"
        )
    lines += [
        f"store: {os.path.abspath(store)}",
        f'open it: python -c "import xarray as xr; print(xr.open_zarr({store!r}))"',
        f"statistics: cam-pipeline report {store}",
    ]
    return "\n".join(lines)
