"""The ``cam-pipeline`` command (also ``python -m pipeline``).

    cam-pipeline run [--input ...] [--model ...] [--output ...] [spiking options] [Beam options]
    cam-pipeline report STORE [--json]
    cam-pipeline sample [--out DIR]

Arguments that ``run`` does not know are passed to Beam (``--runner``,
``--direct_num_workers``, ``--direct_running_mode``, Dataflow options, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys

# Import first: selects tf-keras and makes nengo-dl importable.
import transforms.nengo_shim  # noqa: F401
from pipeline.sample import SAMPLE_DATASET, SAMPLE_MODEL
from transforms.spiking import NEURON_TYPES, SpikingSettings

# Spiking defaults, chosen on the shipped sample (see README, "Spiking defaults").
DEFAULT_SYNAPSE = 0.005
DEFAULT_SCALE_FIRING_RATES = 100.0


def _synapse(text: str) -> float | str | None:
    if text == "auto":
        return text
    if text.lower() in ("none", "0"):
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a synapse time constant must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_run_parser(commands) -> None:
    run = commands.add_parser(
        "run",
        help="compute per-timestep CAMs of a spiking version of a Keras model into a zarr store",
        description="Unknown options are passed to Apache Beam (e.g. --runner, "
        "--direct_num_workers=2 --direct_running_mode=multi_processing).",
    )
    run.add_argument("--input", default=str(SAMPLE_DATASET),
                     help="tfds dataset directory, or TFRecord path/glob (default: the shipped sample)")
    run.add_argument("--split", default="test", help="tfds split to read (default: test)")
    run.add_argument("--model", default=str(SAMPLE_MODEL),
                     help="tf-keras model file ending GAP -> Dense (default: the shipped model)")
    run.add_argument("--output", default="cams.zarr", help="zarr store to write (default: cams.zarr)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing store")
    spiking = run.add_argument_group("spiking network")
    spiking.add_argument("--neuron", choices=sorted(NEURON_TYPES), default="spiking-relu",
                         help="neuron type swapped in for ReLU (relu: rate neurons; default: spiking-relu)")
    spiking.add_argument("--n-steps", type=_positive_int, default=30, help="timesteps per image (default: 30)")
    spiking.add_argument("--dt", type=float, default=0.001, help="step length in seconds (default: 0.001)")
    spiking.add_argument("--synapse", type=_synapse, default="auto",
                         help=f"lowpass time constant (s) on connections out of neurons, or none "
                         f"(default: {DEFAULT_SYNAPSE} for spiking neurons, none for relu)")
    spiking.add_argument("--probe-synapse", type=_synapse, default="auto",
                         help="lowpass (s) on the probed feature maps, or none (default: as --synapse, "
                         "so that mean(cam) + bias = logits)")
    spiking.add_argument("--scale-firing-rates", type=float, default=DEFAULT_SCALE_FIRING_RATES,
                         help=f"firing-rate scale (default: {DEFAULT_SCALE_FIRING_RATES:g})")
    spiking.add_argument("--batch-size", type=_positive_int, default=16,
                         help="images per simulator minibatch (default: 16)")
    store = run.add_argument_group("store")
    store.add_argument("--limit", type=_positive_int, help="process only the first N images")
    store.add_argument("--max-boxes", type=_positive_int, default=8,
                       help="ground-truth boxes kept per image; an image with more fails (default: 8)")
    store.add_argument("--images-per-chunk", type=_positive_int,
                       help="zarr chunk size along image (default: about 8 MB of cam per chunk)")
    stats = run.add_argument_group("statistics")
    stats.add_argument("--cam-threshold", type=float, default=0.2,
                       help="CAM-paper box: keep pixels >= this fraction of the map's maximum (default: 0.2)")


def _settings(args: argparse.Namespace) -> SpikingSettings:
    synapse = args.synapse
    if synapse == "auto":
        synapse = None if args.neuron == "relu" else DEFAULT_SYNAPSE
    probe_synapse = synapse if args.probe_synapse == "auto" else args.probe_synapse
    return SpikingSettings(
        neuron=args.neuron,
        n_steps=args.n_steps,
        dt=args.dt,
        synapse=synapse,
        probe_synapse=probe_synapse,
        scale_firing_rates=args.scale_firing_rates,
        batch_size=args.batch_size,
    )


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="cam-pipeline", description=__doc__.splitlines()[0])
    commands = main.add_subparsers(dest="command", required=True)
    _add_run_parser(commands)
    report = commands.add_parser("report", help="print a store's dataset-level statistics")
    report.add_argument("store", help="a store written by cam-pipeline run")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.add_argument("--every", type=_positive_int, default=1, help="show every N-th step (default: 1)")
    sample = commands.add_parser("sample", help="regenerate the shipped sample dataset and model")
    sample.add_argument("--out", default=None, help="directory to write (default: the shipped sample's)")
    sample.add_argument("--n-test", type=_positive_int, default=300, help="test images (default: 300)")
    sample.add_argument("--epochs", type=_positive_int, default=24, help="training epochs (default: 24)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--with-train", action="store_true", help="also write the train split")
    return main


def _run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.run import RequestError, RunRequest, execute, summary

    try:
        request = RunRequest(
            input=args.input,
            split=args.split,
            model=args.model,
            output=args.output,
            settings=_settings(args),
            limit=args.limit,
            max_boxes=args.max_boxes,
            images_per_chunk=args.images_per_chunk,
            overwrite=args.overwrite,
            cam_threshold=args.cam_threshold,
        )
        ds = execute(request, beam_args)
    except (RequestError, ValueError) as err:
        print(f"cam-pipeline run: error: {err}", file=sys.stderr)
        return 2
    print(summary(ds, args.output))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pipeline.sample import SAMPLE_DIR, make_sample

    info = make_sample(args.out or SAMPLE_DIR, args.n_test, args.epochs, args.seed, args.with_train)
    print(f"sample written to {args.out or SAMPLE_DIR}: {info}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pipeline", "transforms"):
        logging.getLogger(name).setLevel(logging.INFO)
    args, extra = parser().parse_known_args(argv)
    if args.command == "run":
        return _run(args, extra)
    if extra:
        parser().error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "report":
        from pipeline.report import report

        print(report(args.store, args.json, args.every))
        return 0
    return _sample(args)
