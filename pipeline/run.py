"""``cam-pipeline run``: check the request, write the store's template, run Beam, summarize."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import shutil

import apache_beam as beam
import numpy as np
import xarray as xr
import xarray_beam as xbeam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.graph import build_pipeline
from transforms.cam_chunks import ChunkJob
from transforms.model_head import CamHead, find_cam_head, load_keras_model
from transforms.records import InputDataset, InputError, limit_files, open_input
from transforms.spiking import SpikingSettings, convert
from transforms.statistics import StatisticsSettings
from transforms.summary import write_summary
from transforms.store import (
    STATUS_DONE,
    STATUS_FAILED,
    StoreLayout,
    build_template,
    chunk_size_for,
    zarr_chunks,
)

log = logging.getLogger(__name__)

PACKAGES = ("tensorflow", "tf-keras", "nengo", "nengo-dl", "apache-beam", "zarr", "xarray",
            "xarray-beam", "numpy", "tensorflow-datasets")


class RequestError(ValueError):
    """The run request is invalid; raised before any work is done."""


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """A checked ``run`` request (see ``pipeline.cli`` for the options)."""

    input: str
    split: str
    model: str
    output: str
    settings: SpikingSettings
    limit: int | None = None
    max_boxes: int = 8
    images_per_chunk: int | None = None
    overwrite: bool = False
    cam_threshold: float = 0.2


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in PACKAGES}


def run_attrs(request: RunRequest, head: CamHead, dataset: InputDataset, layout: StoreLayout) -> dict:
    """The store's attributes: everything needed to know how it was made."""
    s = request.settings
    return {
        "title": "Per-timestep class activation maps of a spiking (NengoDL) CNN",
        "model_file": os.path.abspath(request.model),
        "model_sha256": _sha256(request.model),
        "feature_layer": head.feature_layer,
        "dense_layer": head.dense_layer,
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
        "images_per_chunk": layout.images_per_chunk,
        "limit": "none" if request.limit is None else request.limit,
        "preprocessing": "decode to uint8, match channels (gray<->RGB by luminance), "
        "bilinear resize to the model input, scale to [0, 1]",
        "package_versions": _versions(),
    }


def prepare(request: RunRequest) -> tuple[InputDataset, ChunkJob, xr.Dataset]:
    """Check the request and build the template; RequestError before any work."""
    if os.path.exists(request.output) and not request.overwrite:
        raise RequestError(f"{request.output}: already exists; pass --overwrite to replace it")
    if not os.path.isfile(request.model):
        raise RequestError(f"{request.model}: no such model file")
    if not 0 < request.cam_threshold <= 1:
        raise RequestError(f"--cam-threshold must be in (0, 1], got {request.cam_threshold}")
    try:
        model = load_keras_model(request.model)
        head = find_cam_head(model, request.model)
        neuron_layers = convert(model, head, request.settings).neuron_layers
        dataset = open_input(request.input, request.split)
    except (InputError, ValueError) as err:
        raise RequestError(str(err)) from err
    if request.limit is not None:
        dataset = dataclasses.replace(dataset, files=limit_files(dataset.files, request.limit))
    if dataset.n_records == 0:
        raise RequestError(f"{request.input}: no records to process")
    class_names = list(dataset.class_names or [str(k) for k in range(head.n_classes)])
    if len(class_names) != head.n_classes:
        raise RequestError(
            f"{request.input} has {len(class_names)} label names but the model's Dense layer "
            f"{head.dense_layer!r} has {head.n_classes} outputs"
        )
    s = request.settings
    layout = StoreLayout(
        n_images=dataset.n_records,
        n_steps=s.n_steps,
        dt=s.dt,
        max_boxes=request.max_boxes,
        images_per_chunk=request.images_per_chunk or chunk_size_for(head, s.n_steps, s.batch_size),
    )
    statistics = StatisticsSettings(size=head.input_shape[:2], threshold=request.cam_threshold)
    ids, files, records = dataset.record_table()
    template = build_template(
        layout, head, ids, files, records, class_names, neuron_layers, statistics.thresholds,
        run_attrs(request, head, dataset, layout),
    )
    job = ChunkJob(os.path.abspath(request.model), s, dataset.decoder, layout, statistics)
    return dataset, job, template


def beam_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options from the pass-through arguments; local default: FnApiRunner (no Prism
    download, which fails offline)."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=FnApiRunner")
    return PipelineOptions(args)


def execute(request: RunRequest, beam_args: list[str]) -> xr.Dataset:
    """Run the whole job; return the store opened with xarray."""
    dataset, job, template = prepare(request)
    if os.path.exists(request.output):
        shutil.rmtree(request.output)
    xbeam.setup_zarr(template, request.output, zarr_chunks(job.layout))
    log.info("store %s set up for %d images; running Beam", request.output, job.layout.n_images)
    with beam.Pipeline(options=beam_options(beam_args)) as p:
        build_pipeline(p, dataset.files, job, template, request.output)
    write_summary(request.output)
    return xr.open_zarr(request.output)


def summary(ds: xr.Dataset, store: str) -> str:
    """A few lines for the terminal: counts, accuracies, where the store is."""
    status = ds["status"].values
    done = status == STATUS_DONE
    labelled = done & (ds["label"].values >= 0)
    lines = [
        f"images: {status.size} ({done.sum()} done, {(status == STATUS_FAILED).sum()} failed, "
        f"{(status == 0).sum()} never written)",
    ]
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
    ]
    return "\n".join(lines)
