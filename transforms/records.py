"""Input datasets: find the TFRecord files, give every record a global index, decode records.

Two kinds of input:

- a tfds-prepared directory (it holds ``dataset_info.json``): files, record counts, label
  names and features come from the dataset's own metadata, and records are decoded with
  its own feature connectors;
- a TFRecord path or glob of ``tf.train.Example`` records with the common key conventions
  (``image/encoded``, ``image/class/label``, ``image/object/bbox/{ymin,xmin,ymax,xmax}``).

Global image index: files sorted by path, then records in file order.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transforms.nengo_shim import tf


class InputError(ValueError):
    """The input request cannot be served (nothing matches, bad metadata, ...)."""


@dataclass(frozen=True)
class InputFile:
    """One TFRecord file: its records are images ``first_index .. first_index + n_records - 1``."""

    path: str
    first_index: int
    n_records: int
    compression: str = ""  # "" or "GZIP"


@dataclass(frozen=True)
class Example:
    """A decoded record. image: (h, w, c) uint8; label: class index or -1; boxes: (n, 4)
    float32 (ymin, xmin, ymax, xmax) in [0, 1]."""

    image: np.ndarray
    label: int
    boxes: np.ndarray


@dataclass(frozen=True)
class TfdsDecoder:
    """Decodes records of a tfds-prepared dataset with its own feature connectors.

    image_key, label_key, bbox_key: paths in the feature dict ("objects/bbox"); label_key
    and bbox_key are empty when the dataset has no such feature.
    """

    dataset_dir: str
    image_key: str
    label_key: str
    bbox_key: str

    @functools.cached_property
    def _features(self):
        import tensorflow_datasets as tfds

        return tfds.features.FeatureConnector.from_config(self.dataset_dir)

    def decode(self, serialized: bytes) -> Example:
        values = self._features.deserialize_example_np(serialized)
        image = np.asarray(_get_path(values, self.image_key))
        label = int(_get_path(values, self.label_key)) if self.label_key else -1
        boxes = (
            np.asarray(_get_path(values, self.bbox_key), np.float32).reshape(-1, 4)
            if self.bbox_key
            else np.zeros((0, 4), np.float32)
        )
        return Example(image, label, boxes)


@dataclass(frozen=True)
class ExampleDecoder:
    """Decodes ``tf.train.Example`` records holding an encoded image (JPEG, PNG, GIF, BMP)."""

    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    bbox_prefix: str = "image/object/bbox/"

    def decode(self, serialized: bytes) -> Example:
        features = tf.train.Example.FromString(serialized).features.feature
        if self.image_key not in features:
            raise ValueError(f"no feature {self.image_key!r} (has {sorted(features)})")
        encoded = features[self.image_key].bytes_list.value
        if len(encoded) != 1:
            raise ValueError(f"feature {self.image_key!r} holds {len(encoded)} images, not 1")
        image = tf.io.decode_image(encoded[0], expand_animations=False).numpy()
        label = -1
        if self.label_key in features:
            values = features[self.label_key].int64_list.value
            if len(values) != 1:
                raise ValueError(f"feature {self.label_key!r} holds {len(values)} values, not 1")
            label = int(values[0])
        coords = [
            np.asarray(features[self.bbox_prefix + c].float_list.value, np.float32)
            if self.bbox_prefix + c in features
            else np.zeros(0, np.float32)
            for c in ("ymin", "xmin", "ymax", "xmax")
        ]
        if len({len(c) for c in coords}) != 1:
            raise ValueError(f"box features under {self.bbox_prefix!r} differ in length")
        return Example(image, label, np.stack(coords, axis=-1).reshape(-1, 4))


@dataclass(frozen=True)
class InputDataset:
    """What a run reads: files in global order, how to decode them, and the class names."""

    files: tuple[InputFile, ...]
    decoder: TfdsDecoder | ExampleDecoder
    class_names: tuple[str, ...] | None
    description: dict = field(default_factory=dict)

    @property
    def n_records(self) -> int:
        return sum(f.n_records for f in self.files)

    def record_table(self) -> tuple[list[str], list[str], np.ndarray]:
        """Per image, in global order: image_id (``<file name>:<record>``), file, record index."""
        ids, files, records = [], [], []
        for f in self.files:
            name = os.path.basename(f.path)
            ids += [f"{name}:{i}" for i in range(f.n_records)]
            files += [f.path] * f.n_records
            records.append(np.arange(f.n_records, dtype=np.int64))
        return ids, files, np.concatenate(records) if records else np.zeros(0, np.int64)


def _get_path(values: dict, path: str):
    for part in path.split("/"):
        values = values[part]
    return values


def _find_features(features, kinds: tuple[str, ...], prefix: str = "") -> list[str]:
    """Paths of features (within dicts and sequences) whose class name is in ``kinds``."""
    import tensorflow_datasets as tfds

    found = []
    for name, feature in features.items():
        path = f"{prefix}{name}"
        if type(feature).__name__ in kinds:
            found.append(path)
        elif isinstance(feature, tfds.features.Sequence):
            inner = feature.feature
            if isinstance(inner, tfds.features.FeaturesDict):
                found += _find_features(inner, kinds, path + "/")
            elif type(inner).__name__ in kinds:
                found.append(path)
        elif isinstance(feature, tfds.features.FeaturesDict):
            found += _find_features(feature, kinds, path + "/")
    return found


def is_tfds_dir(path: str) -> bool:
    return tf.io.gfile.isdir(path) and tf.io.gfile.exists(os.path.join(path, "dataset_info.json"))


def open_tfds_dir(path: str, split: str) -> InputDataset:
    """A tfds-prepared directory: files and counts from its metadata, features from its own."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(path)
    info = builder.info
    if split not in info.splits:
        raise InputError(f"{path}: no split {split!r} (has {sorted(info.splits)})")
    split_info = info.splits[split]
    if builder.info.file_format.value != "tfrecord":
        raise InputError(f"{path}: file format {info.file_format.value!r}; only tfrecord is read")
    features = info.features
    images = _find_features(features, ("Image",))
    if not images:
        raise InputError(f"{path}: the dataset has no Image feature")
    top_level_labels = [k for k, v in features.items() if type(v).__name__ == "ClassLabel"]
    boxes = _find_features(features, ("BBoxFeature",))
    label_key = "label" if "label" in top_level_labels else (top_level_labels or [""])[0]
    decoder = TfdsDecoder(str(path), images[0], label_key, boxes[0] if boxes else "")
    files, first = [], 0
    for filename, count in zip(split_info.filepaths, split_info.shard_lengths):
        files.append(InputFile(os.fspath(filename), first, int(count)))
        first += int(count)
    names = tuple(features[label_key].names) if label_key else None
    return InputDataset(
        tuple(files),
        decoder,
        names,
        {"kind": "tfds", "path": str(path), "name": info.name, "split": split,
         "image_feature": images[0], "label_feature": label_key, "bbox_feature": decoder.bbox_key},
    )


def count_records(path: str, compression: str = "") -> int:
    """Number of records in a TFRecord file (reads it through)."""
    dataset = tf.data.TFRecordDataset(path, compression_type=compression)
    return int(dataset.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def open_tfrecord_glob(pattern: str, decoder: ExampleDecoder) -> InputDataset:
    """TFRecord files matching ``pattern`` (a path or glob, local or gs://), sorted."""
    paths = sorted(tf.io.gfile.glob(pattern))
    if not paths:
        raise InputError(f"{pattern}: no file matches")
    files, first = [], 0
    for path in paths:
        compression = "GZIP" if path.endswith(".gz") else ""
        count = count_records(path, compression)
        files.append(InputFile(path, first, count, compression))
        first += count
    return InputDataset(
        tuple(files), decoder, None, {"kind": "tfrecord", "path": pattern, "image_feature": decoder.image_key}
    )


def open_input(path: str, split: str = "test") -> InputDataset:
    """A tfds directory, or else a TFRecord path/glob of tf.train.Example records."""
    if is_tfds_dir(path):
        return open_tfds_dir(path, split)
    if tf.io.gfile.isdir(path):
        raise InputError(f"{path}: a directory without dataset_info.json is not a tfds dataset; "
                         "pass a glob of its TFRecord files instead")
    return open_tfrecord_glob(path, ExampleDecoder())


def read_records(file: InputFile):
    """Yield (global index, serialized record) for the first ``n_records`` records of ``file``."""
    dataset = tf.data.TFRecordDataset(file.path, compression_type=file.compression)
    for offset, record in enumerate(dataset.take(file.n_records).as_numpy_iterator()):
        yield file.first_index + offset, record


def limit_files(files: tuple[InputFile, ...], n_images: int) -> tuple[InputFile, ...]:
    """The files cut to their first ``n_images`` records in global order."""
    kept = []
    for f in files:
        if f.first_index >= n_images:
            break
        kept.append(dataclasses.replace(f, n_records=min(f.n_records, n_images - f.first_index)))
    return tuple(kept)


def to_model_input(image: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 (h, w, c) -> float32 (H, W, C) in [0, 1] for the model.

    Channels: gray is repeated to RGB, RGB is reduced to gray by luminance; size: bilinear
    resize when it differs.
    """
    height, width, channels = input_shape
    if image.ndim == 2:
        image = image[..., None]
    x = image.astype(np.float32) / 255.0
    if x.shape[-1] == 4:
        x = x[..., :3]
    if x.shape[-1] != channels:
        if channels == 1 and x.shape[-1] == 3:
            x = x @ np.array([[0.299], [0.587], [0.114]], np.float32)
        elif channels == 3 and x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        else:
            raise ValueError(f"image has {image.shape[-1]} channels; the model takes {channels}")
    if x.shape[:2] != (height, width):
        x = tf.image.resize(x, (height, width), method="bilinear").numpy()
    return x
