"""``cam-pipeline verify STORE``: is the store complete and consistent?

Checks that every image is done or listed as failed (with a reason), that the records
counted per file add up to the images, that no chunk of any computed variable is missing,
and that the run's attributes are all there. ``--deep`` also reads every chunk back.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
import zarr

from transforms.store import (
    LAZY_VARIABLES,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_NEVER_WRITTEN,
)

REQUIRED_ATTRS = (
    "model_file", "model_sha256", "neuron", "n_steps", "dt", "synapse", "probe_synapse",
    "scale_firing_rates", "dataset", "dataset_files", "preprocessing", "package_versions",
    "cam_threshold", "n_images", "images_per_chunk", "request_fingerprint",
)


def _examples(ids: np.ndarray, limit: int = 3) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def verify(store: str, deep: bool = False) -> tuple[list[str], str]:
    """(problems, one-line description of the store). No problems: the store is complete."""
    try:
        ds = xr.open_zarr(store)
        group = zarr.open_group(store, mode="r")
    except Exception as err:  # noqa: BLE001 - any failure to open is the finding
        return [f"cannot open the store: {type(err).__name__}: {err}"], ""
    problems = [f"attribute {name!r} is missing" for name in REQUIRED_ATTRS if name not in ds.attrs]
    missing_vars = [name for name in LAZY_VARIABLES if name not in ds]
    problems += [f"variable {name!r} is missing" for name in missing_vars]
    for name in LAZY_VARIABLES:
        if name in missing_vars:
            continue
        array = group[name]
        if array.nchunks_initialized != array.nchunks:
            problems.append(f"{name}: {array.nchunks - array.nchunks_initialized} of {array.nchunks} chunks missing")
    status = ds["status"].values
    ids = ds["image_id"].values
    never = np.flatnonzero(status == STATUS_NEVER_WRITTEN)
    if never.size:
        problems.append(f"{never.size} images never written ({_examples(ids[never])}); run again with --resume")
    unknown = np.flatnonzero(~np.isin(status, (STATUS_NEVER_WRITTEN, STATUS_DONE, STATUS_FAILED)))
    if unknown.size:
        problems.append(f"{unknown.size} images with an unknown status ({_examples(ids[unknown])})")
    failed = status == STATUS_FAILED
    errors = ds["error"].values
    unexplained = np.flatnonzero(failed & (errors == ""))
    if unexplained.size:
        problems.append(f"{unexplained.size} failed images without a reason ({_examples(ids[unexplained])})")
    counted = int(ds["file_n_records"].values.sum())
    if counted != status.size:
        problems.append(f"the files' records ({counted}) do not add up to the images ({status.size})")
    if deep:
        for name in LAZY_VARIABLES:
            if name not in missing_vars:
                try:
                    ds[name].load()
                except Exception as err:  # noqa: BLE001
                    problems.append(f"{name}: cannot be read: {type(err).__name__}: {err}")
    described = (
        f"{status.size} images: {(status == STATUS_DONE).sum()} done, {failed.sum()} failed, "
        f"{never.size} never written; {int((ds['file_error'].values != '').sum())} input files with problems"
    )
    return problems, described
