"""``cam-pipeline report STORE``: the dataset-level statistics as a table (or JSON)."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from transforms.store import STATUS_DONE, STATUS_FAILED

# (column title, variable against timestep, its Keras-model counterpart)
COLUMNS = (
    ("top1 acc", "accuracy", "accuracy_reference"),
    ("top1 loc", "top1_localization", "top1_localization_reference"),
    ("top5 loc", "top5_localization", "top5_localization_reference"),
    ("mean IoU", "mean_iou", "mean_iou_reference"),
    ("pointing", "pointing_accuracy", "pointing_accuracy_reference"),
    ("energy", "mean_energy_in_boxes", "mean_energy_in_boxes_reference"),
    ("corr ref", "mean_corr_reference", None),
)


def _number(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(value, 4)


def report_data(ds: xr.Dataset) -> dict:
    """Everything the report shows, as plain JSON-able values."""
    status = ds["status"].values
    settled = ds["prediction_settled_step"].values[status == STATUS_DONE]
    localized = ds["localization_settled_step"].values[status == STATUS_DONE]
    localized = localized[localized >= 0]
    return {
        "images": int(status.size),
        "done": int((status == STATUS_DONE).sum()),
        "failed": int((status == STATUS_FAILED).sum()),
        "never_written": int((status == 0).sum()),
        "settings": {k: ds.attrs.get(k) for k in ("neuron", "n_steps", "dt", "synapse", "probe_synapse",
                                                  "scale_firing_rates", "cam_threshold")},
        "time_s": [float(t) for t in ds["time"].values],
        "per_step": {name: [_number(v) for v in ds[name].values] for _, name, _ in COLUMNS},
        "reference": {ref: _number(ds[ref].values) for _, _, ref in COLUMNS if ref},
        "max_box_acc": {
            "spiking_last_step": _number(ds["max_box_acc"].values),
            "spiking_threshold": _number(ds["max_box_acc_threshold"].values),
            "reference": _number(ds["max_box_acc_reference"].values),
            "reference_threshold": _number(ds["max_box_acc_threshold_reference"].values),
        },
        "mean_firing_rate_hz_last_step": {
            str(layer): _number(rate) for layer, rate in
            zip(ds["layer"].values, ds["mean_firing_rate"].isel(timestep=-1).values)
        },
        "median_prediction_settled_step": _number(np.median(settled)) if settled.size else None,
        "localization_settles": {
            "images": int(localized.size),
            "median_step": _number(np.median(localized)) if localized.size else None,
        },
    }


def _cell(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:9.3f}"


def report_table(data: dict, every: int = 1) -> str:
    """A readable table: one row per shown step, then the Keras model's row."""
    steps = len(data["time_s"])
    shown = sorted(set(range(0, steps, every)) | {steps - 1})
    header = f"{'step':>5} {'t (ms)':>7}" + "".join(f"{title:>9}" for title, _, _ in COLUMNS)
    lines = [
        f"{data['images']} images: {data['done']} done, {data['failed']} failed, "
        f"{data['never_written']} never written",
        "settings: " + ", ".join(f"{k}={v}" for k, v in data["settings"].items()),
        "",
        header,
        "-" * len(header),
    ]
    for step in shown:
        row = f"{step:>5} {data['time_s'][step] * 1000:>7.1f}"
        lines.append(row + "".join(_cell(data["per_step"][name][step]) for _, name, _ in COLUMNS))
    lines.append(f"{'Keras':>5} {'':>7}" + "".join(
        _cell(data["reference"][ref]) if ref else f"{'':>9}" for _, _, ref in COLUMNS))
    box = data["max_box_acc"]
    rates = ", ".join(f"{k} {v:.1f}" for k, v in data["mean_firing_rate_hz_last_step"].items() if v is not None)
    settles = data["localization_settles"]
    lines += [
        "",
        f"MaxBoxAcc: spiking (last step) {_fmt(box['spiking_last_step'])} at threshold "
        f"{_fmt(box['spiking_threshold'], 2)}; Keras {_fmt(box['reference'])} at "
        f"{_fmt(box['reference_threshold'], 2)}",
        f"prediction settles at step {_fmt(data['median_prediction_settled_step'], 0)} (median); "
        f"top-1 box settles (IoU >= 0.5 to the end) in {settles['images']} images, "
        f"median step {_fmt(settles['median_step'], 0)}",
        f"mean firing rate at the last step (Hz): {rates}",
        "",
        "columns: top-1 accuracy; top-1 and top-5 localization (class right and IoU >= 0.5); mean IoU,",
        "pointing game and energy in boxes of the true class's CAM; its correlation with the Keras CAM.",
    ]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(store: str, as_json: bool = False, every: int = 1) -> str:
    data = report_data(xr.open_zarr(store))
    return json.dumps(data, indent=2) if as_json else report_table(data, every)
