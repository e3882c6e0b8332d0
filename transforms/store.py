"""The output store's layout (see ``shared/STORE.md``): its template and its chunks.

The template declares every variable up front and holds the values known before any
image is processed (coordinates, Dense weights); it is written once by the launcher.
Workers then write whole chunks of ``images_per_chunk`` images along ``image``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
import xarray_beam as xbeam

from transforms.cam import grid_centres
from transforms.model_head import CamHead

STATUS_NEVER_WRITTEN, STATUS_DONE, STATUS_FAILED = 0, 1, 2
BOX_COORDS = ("ymin", "xmin", "ymax", "xmax")

# Variables written by the workers, chunk by chunk along ``image``.
CHUNKED_VARIABLES = (
    "cam",
    "cam_reference",
    "logits",
    "logits_reference",
    "label",
    "boxes",
    "status",
    "error",
)


@dataclass(frozen=True)
class StoreLayout:
    """Sizes of the store. ``max_boxes`` is the box dimension (NaN-padded)."""

    n_images: int
    n_steps: int
    dt: float
    max_boxes: int
    images_per_chunk: int


def chunk_size_for(head: CamHead, n_steps: int, batch_size: int, target_bytes: float = 8e6) -> int:
    """Images per chunk so that a ``cam`` chunk is about ``target_bytes``.

    A multiple of ``batch_size`` so that chunks split into whole simulator batches.
    """
    height, width, _ = head.feature_shape
    cam_bytes_per_image = head.n_classes * n_steps * height * width * 4
    batches = max(1, round(target_bytes / (cam_bytes_per_image * batch_size)))
    return batches * batch_size


def build_template(
    layout: StoreLayout,
    head: CamHead,
    image_ids: list[str],
    source_files: list[str],
    record_indices: np.ndarray,
    class_names: list[str],
    attrs: dict,
) -> xr.Dataset:
    """The store's template: lazy (dask) variables for what workers write, values for the rest."""
    n, t, k = layout.n_images, layout.n_steps, head.n_classes
    height, width, channels = head.feature_shape
    in_height, in_width, _ = head.input_shape

    def empty(shape: tuple[int, ...], dtype, fill) -> np.ndarray:
        return np.full(shape, fill, dtype=dtype)

    dims_cam = ("image", "class", "timestep", "y", "x")
    ds = xr.Dataset(
        {
            "cam": (dims_cam, empty((n, k, t, height, width), np.float32, np.nan)),
            "cam_reference": (
                ("image", "class", "y", "x"),
                empty((n, k, height, width), np.float32, np.nan),
            ),
            "logits": (("image", "timestep", "class"), empty((n, t, k), np.float32, np.nan)),
            "logits_reference": (("image", "class"), empty((n, k), np.float32, np.nan)),
            "label": (("image",), empty((n,), np.int32, -1)),
            "boxes": (
                ("image", "box", "coord"),
                empty((n, layout.max_boxes, 4), np.float32, np.nan),
            ),
            "status": (("image",), empty((n,), np.uint8, STATUS_NEVER_WRITTEN)),
            "error": (("image",), empty((n,), np.dtypes.StringDType(), "")),
            "dense_weights": (("channel", "class"), head.weights),
            "dense_bias": (("class",), head.bias),
        },
        coords={
            "image": np.arange(n, dtype=np.int64),
            "image_id": ("image", np.asarray(image_ids, dtype=object)),
            "source_file": ("image", np.asarray(source_files, dtype=object)),
            "record_index": ("image", np.asarray(record_indices, dtype=np.int64)),
            "class": np.asarray(class_names, dtype=object),
            "timestep": np.arange(t, dtype=np.int64),
            "time": ("timestep", (np.arange(t) + 1) * layout.dt),
            "y": grid_centres(in_height, height),
            "x": grid_centres(in_width, width),
            "channel": np.arange(channels, dtype=np.int64),
            "box": np.arange(layout.max_boxes, dtype=np.int64),
            "coord": np.asarray(BOX_COORDS, dtype=object),
        },
        attrs=attrs,
    )
    _describe(ds)
    return xbeam.make_template(ds, lazy_vars=CHUNKED_VARIABLES)


def _describe(ds: xr.Dataset) -> None:
    descriptions = {
        "cam": ("class activation map: sum over channels of Dense weight times the "
                "(probe-synapse filtered) feature map at each step; signed, no bias", "1"),
        "cam_reference": ("the same map from the non-spiking Keras model", "1"),
        "logits": ("the spiking network's Dense output at each step", "1"),
        "logits_reference": ("the non-spiking Keras model's Dense output", "1"),
        "label": ("ground-truth class index, -1 where the record has none", "1"),
        "boxes": ("ground-truth boxes (ymin, xmin, ymax, xmax) in [0, 1], NaN padding", "1"),
        "status": ("0 never written, 1 done, 2 failed (see error)", "1"),
        "error": ("why the image failed; empty when it did not", ""),
        "dense_weights": ("weights of the Dense layer after global average pooling", "1"),
        "dense_bias": ("bias of that Dense layer, zeros where it has none", "1"),
        "time": ("simulated time at the end of each step: (step + 1) * dt", "s"),
        "y": ("centre of each feature-map row, in input pixels", "pixel"),
        "x": ("centre of each feature-map column, in input pixels", "pixel"),
    }
    for name, (text, units) in descriptions.items():
        ds[name].attrs["description"] = text
        if units:
            ds[name].attrs["units"] = units
    ds["status"].attrs["flag_values"] = [0, 1, 2]
    ds["status"].attrs["flag_meanings"] = "never_written done failed"


def zarr_chunks(layout: StoreLayout) -> dict[str, int]:
    """Chunking of the store: ``images_per_chunk`` along ``image``, whole along the rest."""
    return {"image": layout.images_per_chunk}


def chunk_key(chunk_index: int, layout: StoreLayout) -> xbeam.Key:
    return xbeam.Key({"image": chunk_index * layout.images_per_chunk})


def chunk_bounds(chunk_index: int, layout: StoreLayout) -> tuple[int, int]:
    """[start, stop) image indices of a chunk."""
    start = chunk_index * layout.images_per_chunk
    return start, min(start + layout.images_per_chunk, layout.n_images)


def empty_chunk(template: xr.Dataset, start: int, stop: int) -> dict[str, np.ndarray]:
    """Fill-value arrays for the chunked variables of images [start, stop)."""
    arrays = {}
    for name in CHUNKED_VARIABLES:
        var = template[name]
        shape = (stop - start,) + var.shape[1:]
        fill = {"label": -1, "status": STATUS_NEVER_WRITTEN, "error": ""}.get(name, np.nan)
        arrays[name] = np.full(shape, fill, dtype=var.dtype)
    return arrays


def chunk_dataset(template: xr.Dataset, arrays: dict[str, np.ndarray]) -> xr.Dataset:
    """Wrap a chunk's arrays (keyed by variable name) with the template's dims."""
    return xr.Dataset({name: (template[name].dims, arrays[name]) for name in CHUNKED_VARIABLES})
