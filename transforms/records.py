"""Input datasets: find the TFRecord files, give every record a global index, decode records.

Two kinds of input:

- a tfds-prepared directory (it holds ``dataset_info.json``): files, record counts, label
  names and features come from the dataset's own metadata, and records are decoded with
  its own feature connectors;
- TFRecord paths or globs (local, ``gs://``, any file system TensorFlow knows; gzip or
  not) of ``tf.train.Example`` records, with the common keys by default
  (``image/encoded``, ``image/class/label``, ``image/object/bbox/{ymin,xmin,ymax,xmax}``).

Global image index: files sorted by path, then records in file order. Every record that
is framed in a file gets an index, readable or not, so that nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from transforms.nengo_shim import tf
from transforms.tfrecord_io import (
    BadRecord,
    FileUnreadable,
    is_gzip,
    read_tfrecord,
    scan_tfrecord,
)

BBOX_COORDS = ("ymin", "xmin", "ymax", "xmax")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")  # JPEG, PNG, GIF, BMP


class InputError(ValueError):
    """The input request cannot be served (nothing matches, an unknown key, ...)."""


@dataclass(frozen=True)
class InputFile:
    """One TFRecord file: its records are images ``first_index .. first_index + n_records - 1``.

    error: what went wrong with the file as a whole when it was listed ("" if nothing),
    e.g. an unreadable tail (those records cannot be counted) or no records at all.
    """

    path: str
    first_index: int
    n_records: int
    compressed: bool = False
    error: str = ""


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
    """Decodes ``tf.train.Example`` records.

    image_key: bytes feature holding a JPEG, PNG, GIF or BMP image, or raw uint8 pixels
    (shape from ``raw_shape``, else from ``image/height``, ``image/width``,
    ``image/channels`` int features); label_key: int64 feature (optional in records);
    bbox_keys: four float features (ymin, xmin, ymax, xmax), optional in records.
    """

    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    bbox_keys: tuple[str, str, str, str] = tuple(f"image/object/bbox/{c}" for c in BBOX_COORDS)
    raw_shape: tuple[int, int, int] | None = None

    def decode(self, serialized: bytes) -> Example:
        features = tf.train.Example.FromString(serialized).features.feature
        if self.image_key not in features:
            raise ValueError(f"missing feature {self.image_key!r} (the record has {sorted(features)})")
        encoded = features[self.image_key].bytes_list.value
        if len(encoded) != 1:
            raise ValueError(f"feature {self.image_key!r} holds {len(encoded)} byte strings, not 1")
        image = self._image(encoded[0], features)
        label = -1
        if self.label_key in features:
            values = features[self.label_key].int64_list.value
            if len(values) != 1:
                raise ValueError(f"feature {self.label_key!r} holds {len(values)} int64 values, not 1")
            label = int(values[0])
        coords = [
            np.asarray(features[key].float_list.value, np.float32) if key in features else np.zeros(0, np.float32)
            for key in self.bbox_keys
        ]
        if len({len(c) for c in coords}) != 1:
            raise ValueError(f"box features {list(self.bbox_keys)} differ in length")
        return Example(image, label, np.stack(coords, axis=-1).reshape(-1, 4))

    def _image(self, data: bytes, features) -> np.ndarray:
        if data.startswith(IMAGE_MAGIC):
            return tf.io.decode_image(data, expand_animations=False).numpy()
        shape = self.raw_shape or tuple(
            int(features[k].int64_list.value[0]) if k in features and features[k].int64_list.value else 0
            for k in ("image/height", "image/width", "image/channels")
        )
        if 0 in shape:
            raise ValueError(
                f"feature {self.image_key!r} is not a JPEG/PNG/GIF/BMP image and no raw shape is known "
                "(pass --raw-shape H,W,C or store image/height, image/width, image/channels)"
            )
        if len(data) != int(np.prod(shape)):
            raise ValueError(f"raw image has {len(data)} bytes, not {'x'.join(map(str, shape))}")
        return np.frombuffer(data, np.uint8).reshape(shape)


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


def _pick(kind: str, given: str, found: list[str], path: str, optional: bool) -> str:
    if given:
        if given not in found:
            raise InputError(f"{path}: no {kind} feature {given!r} (its {kind} features: {found or 'none'})")
        return given
    if not found and not optional:
        raise InputError(f"{path}: the dataset has no {kind} feature")
    return found[0] if found else ""


def open_tfds_dir(path: str, split: str, keys: dict[str, str]) -> InputDataset:
    """A tfds-prepared directory: files and counts from its metadata, features from its own.

    keys: optional "image", "label", "bbox" feature paths overriding the discovered ones.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(path)
    info = builder.info
    if split not in info.splits:
        raise InputError(f"{path}: no split {split!r} (has {sorted(info.splits)})")
    if info.file_format.value != "tfrecord":
        raise InputError(f"{path}: file format {info.file_format.value!r}; only tfrecord is read")
    features = info.features
    labels = [k for k, v in features.items() if type(v).__name__ == "ClassLabel"]
    labels = sorted(labels, key=lambda k: k != "label")  # prefer a feature called "label"
    image_key = _pick("Image", keys.get("image", ""), _find_features(features, ("Image",)), path, False)
    label_key = _pick("ClassLabel", keys.get("label", ""), labels, path, True)
    bbox_key = _pick("BBoxFeature", keys.get("bbox", ""), _find_features(features, ("BBoxFeature",)), path, True)
    decoder = TfdsDecoder(str(path), image_key, label_key, bbox_key)
    split_info = info.splits[split]
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
         "image_feature": image_key, "label_feature": label_key, "bbox_feature": bbox_key},
    )


def _expand(patterns: list[str]) -> list[str]:
    paths = set()
    for pattern in patterns:
        matches = tf.io.gfile.glob(pattern)
        if not matches:
            raise InputError(f"{pattern}: no file matches")
        paths.update(matches)
    return sorted(paths)


def open_tfrecord_files(patterns: list[str], decoder: ExampleDecoder) -> InputDataset:
    """TFRecord files matching ``patterns`` (paths or globs), sorted and scanned.

    Each file is read through once to count its records (in parallel threads); a file
    that cannot be read to the end keeps the records before the damage.
    """
    paths = _expand(patterns)
    with ThreadPoolExecutor(max_workers=8) as pool:
        compressed = list(pool.map(is_gzip, paths))
        scans = list(pool.map(scan_tfrecord, paths, compressed))
    files, first = [], 0
    for path, gz, scan in zip(paths, compressed, scans):
        files.append(InputFile(path, first, scan.n_records, gz, scan.error))
        first += scan.n_records
    dataset = InputDataset(
        tuple(files), decoder, None,
        {"kind": "tfrecord", "path": " ".join(patterns), "image_feature": decoder.image_key,
         "label_feature": decoder.label_key, "bbox_features": " ".join(decoder.bbox_keys)},
    )
    _check_keys(dataset)
    return dataset


def _check_keys(dataset: InputDataset) -> None:
    """Refuse, before any work, an image key that the first readable record lacks."""
    decoder = dataset.decoder
    for file in dataset.files:
        for _, record in read_records(file):
            if isinstance(record, bytes):
                try:
                    keys = tf.train.Example.FromString(record).features.feature.keys()
                except Exception:  # noqa: BLE001 - an undecodable record fails on its own later
                    continue
                if decoder.image_key not in keys:
                    raise InputError(
                        f"{file.path}: records have no feature {decoder.image_key!r} "
                        f"(the first has {sorted(keys)}); pass --image-key"
                    )
                return


def open_input(paths: list[str], split: str = "test", keys: dict[str, str] | None = None,
               raw_shape: tuple[int, int, int] | None = None) -> InputDataset:
    """One tfds directory, or TFRecord paths/globs of tf.train.Example records.

    keys: optional "image", "label", "bbox" overrides (for TFRecords, "bbox" is a prefix
    to which ymin, xmin, ymax, xmax are appended, or four comma-separated keys).
    """
    keys = {k: v for k, v in (keys or {}).items() if v}
    if len(paths) == 1 and is_tfds_dir(paths[0]):
        return open_tfds_dir(paths[0], split, keys)
    for path in paths:
        if tf.io.gfile.isdir(path):
            raise InputError(f"{path}: a directory without dataset_info.json is not a tfds dataset; "
                             "pass a glob of its TFRecord files instead")
    decoder = ExampleDecoder(raw_shape=raw_shape)
    if "image" in keys:
        decoder = dataclasses.replace(decoder, image_key=keys["image"])
    if "label" in keys:
        decoder = dataclasses.replace(decoder, label_key=keys["label"])
    if "bbox" in keys:
        bbox = keys["bbox"].split(",")
        if len(bbox) not in (1, 4):
            raise InputError(f"--bbox-keys: give a prefix or four keys, got {keys['bbox']!r}")
        decoder = dataclasses.replace(
            decoder, bbox_keys=tuple(bbox) if len(bbox) == 4 else tuple(bbox[0] + c for c in BBOX_COORDS)
        )
    return open_tfrecord_files(paths, decoder)


def read_records(file: InputFile) -> Iterator[tuple[int, bytes | BadRecord]]:
    """(global index, record bytes or BadRecord) for each of the ``n_records`` of ``file``.

    Exactly ``n_records`` items: records lost to damage found while reading (past what the
    listing saw, e.g. in a tfds shard) come out as BadRecords with the reason.
    """
    produced = 0
    try:
        for record in read_tfrecord(file.path, file.compressed):
            if produced == file.n_records:
                return
            yield file.first_index + produced, record
            produced += 1
        reason = f"missing: the file holds only {produced} records"
    except FileUnreadable as err:
        reason = f"unreadable: {err}"
    except (tf.errors.OpError, OSError) as err:
        reason = f"cannot read the file: {err}"
    for offset in range(produced, file.n_records):
        yield file.first_index + offset, BadRecord(reason)


def check_example(example: Example, n_classes: int, max_boxes: int) -> None:
    """Raise ValueError when a decoded record does not fit the store."""
    if not -1 <= example.label < n_classes:
        raise ValueError(f"label {example.label} is outside 0..{n_classes - 1}")
    if len(example.boxes) > max_boxes:
        raise ValueError(f"{len(example.boxes)} boxes, more than --max-boxes={max_boxes}")


def decode_failure(err: Exception) -> str:
    """The reason recorded for an image that failed to decode or to fit the model."""
    return f"decode: {type(err).__name__}: {err}"


def decode_record(record: tuple[int, bytes | BadRecord], decoder: TfdsDecoder | ExampleDecoder,
                  n_classes: int, max_boxes: int) -> tuple[int, Example | BadRecord]:
    """(global index, record) -> (global index, its Example, or a BadRecord whose reason
    says which stage failed: ``read: ...`` or ``decode: <error type>: ...``)."""
    index, data = record
    if isinstance(data, BadRecord):
        return index, BadRecord(f"read: {data.reason}")
    try:
        example = decoder.decode(data)
        check_example(example, n_classes, max_boxes)
    except Exception as err:  # noqa: BLE001 - every failure is recorded per image
        return index, BadRecord(decode_failure(err))
    return index, example


def limit_files(files: tuple[InputFile, ...], n_images: int) -> tuple[InputFile, ...]:
    """The files cut to their first ``n_images`` records in global order."""
    kept = []
    for f in files:
        if f.first_index >= n_images:
            break
        kept.append(dataclasses.replace(f, n_records=min(f.n_records, n_images - f.first_index)))
    return tuple(kept)
