"""The ``cam-pipeline`` command (also ``python -m pipeline``).

    cam-pipeline run [--input ...] [--model ...] [--output ...] [spiking options] [Beam options]
    cam-pipeline verify STORE [--deep]
    cam-pipeline report STORE [--json]
    cam-pipeline sample [--out DIR]

Arguments that ``run`` does not know are passed to Beam (``--runner``,
``--direct_num_workers``, ``--direct_running_mode``, Dataflow options, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

# Import first: selects tf-keras and makes nengo-dl importable.
import transforms.nengo_shim  # noqa: F401
from pipeline.sample import SAMPLE_DATASET, SAMPLE_MODEL
from transforms.preprocess import SCALINGS, Preprocessing
from transforms.spiking import ENGINES, NEURON_TYPES, SpikingSettings

if TYPE_CHECKING:
    from pipeline.run import RunRequest

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


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _shape(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W,C (three positive integers), got {text!r}")
    return values


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
    run.add_argument("--input", nargs="+", default=[str(SAMPLE_DATASET)], metavar="PATH",
                     help="a tfds dataset directory, or TFRecord paths/globs, local or gs:// "
                     "(default: the shipped sample)")
    run.add_argument("--split", default="test", help="tfds split to read (default: test)")
    run.add_argument("--model", default=str(SAMPLE_MODEL),
                     help="tf-keras model file ending GAP -> Dense (default: the shipped model)")
    run.add_argument("--output", default="cams.zarr", help="zarr store to write (default: cams.zarr)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing store")
    run.add_argument("--resume", action="store_true",
                     help="finish an existing store made by the same request: compute only what is not done")
    inputs = run.add_argument_group("input records")
    inputs.add_argument("--image-key", default="", help="image feature (default: tfds's Image feature, "
                        "or image/encoded in tf.train.Example records)")
    inputs.add_argument("--label-key", default="", help="label feature (default: tfds's ClassLabel, "
                        "or image/class/label)")
    inputs.add_argument("--bbox-keys", default="", help="box features: tfds BBoxFeature path, or a prefix "
                        "(+ ymin, xmin, ymax, xmax), or four comma-separated keys "
                        "(default: image/object/bbox/)")
    inputs.add_argument("--raw-shape", type=_shape, help="H,W,C of raw uint8 pixel images (default: from "
                        "image/height, image/width, image/channels)")
    prep = run.add_argument_group("preprocessing (images are matched to the model's channels and size)")
    prep.add_argument("--scaling", choices=SCALINGS, default="unit",
                      help="unit: pixels / 255; mean: (pixels - --mean) / --std; keras: "
                      "tf_keras.applications.<--keras-app>.preprocess_input; none: 0..255 pixels as they "
                      "are, for a model that scales its input itself (a Rescaling or Normalization layer) "
                      "(default: unit)")
    prep.add_argument("--mean", type=_floats, default=(), help="per-channel means in 0..255, e.g. 123.7,116.3,103.5")
    prep.add_argument("--std", type=_floats, default=(), help="per-channel standard deviations in 0..255")
    prep.add_argument("--keras-app", default="", help="e.g. vgg19, resnet50, mobilenet_v2")
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
                         help="images per simulator minibatch (default: 16; the fast engine runs fewer "
                         "at once where a large network's values over all steps would not fit in a quarter "
                         "of the memory)")
    spiking.add_argument("--worker-threads", type=_positive_int,
                         help="TensorFlow threads per worker process (default: the cores shared "
                         "out among --direct_num_workers processes; TensorFlow's default otherwise)")
    spiking.add_argument("--engine", choices=ENGINES, default="fast",
                         help="fast: each layer for all timesteps at once, TensorFlow's ops for the linear "
                         "layers and compiled numba kernels for neurons and synapses (falls back to "
                         "nengo-dl, with a log line, where a network is not supported); nengo-dl: "
                         "nengo_dl.Simulator, the reference (default: fast)")
    store = run.add_argument_group("store")
    store.add_argument("--limit", type=_positive_int, help="process only the first N images")
    store.add_argument("--max-boxes", type=_positive_int, default=8,
                       help="ground-truth boxes kept per image; an image with more fails (default: 8)")
    store.add_argument("--images-per-chunk", type=_positive_int,
                       help="zarr chunk size along image (default: about 20 MB of cam per chunk)")
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
        engine=args.engine,
    )


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="cam-pipeline", description=__doc__.splitlines()[0])
    commands = main.add_subparsers(dest="command", required=True)
    _add_run_parser(commands)
    verify = commands.add_parser("verify", help="check that a store is complete and consistent")
    verify.add_argument("store", help="a store written by cam-pipeline run")
    verify.add_argument("--deep", action="store_true", help="also read every chunk back")
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


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """The ``pipeline.run.RunRequest`` that parsed ``run`` arguments ask for (ValueError on
    invalid settings)."""
    from pipeline.run import RunRequest

    return RunRequest(
        input=tuple(args.input),
        split=args.split,
        model=args.model,
        output=args.output,
        settings=_settings(args),
        preprocessing=Preprocessing(args.scaling, args.mean, args.std, args.keras_app),
        feature_keys=(("image", args.image_key), ("label", args.label_key), ("bbox", args.bbox_keys)),
        raw_shape=args.raw_shape,
        limit=args.limit,
        max_boxes=args.max_boxes,
        images_per_chunk=args.images_per_chunk,
        cam_threshold=args.cam_threshold,
        overwrite=args.overwrite,
        resume=args.resume,
        worker_threads=args.worker_threads,
    )


def _run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.run import RequestError, execute, summary

    try:
        request = request_from_args(args)
    except ValueError as err:  # invalid settings
        print(f"cam-pipeline run: error: {err}", file=sys.stderr)
        return 2
    try:
        ds = execute(request, beam_args)
    except RequestError as err:
        print(f"cam-pipeline run: error: {err}", file=sys.stderr)
        return 2
    print(summary(ds, args.output))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.verify import verify

    problems, described = verify(args.store, args.deep)
    for problem in problems:
        print(f"{args.store}: {problem}", file=sys.stderr)
    print(f"{args.store}: {'PROBLEMS' if problems else 'OK'}{': ' + described if described else ''}")
    return 1 if problems else 0


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
    if args.command == "verify":
        return _verify(args)
    if args.command == "report":
        from pipeline.report import report

        print(report(args.store, args.json, args.every))
        return 0
    return _sample(args)
