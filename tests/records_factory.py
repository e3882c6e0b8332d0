"""Make TFRecord files of tf.train.Example records from the sample, and damage them."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from transforms.nengo_shim import tf


def example(image_bytes: bytes | None, label: int, box: np.ndarray | None, extra: dict | None = None) -> bytes:
    """A tf.train.Example with the common keys (image/encoded, image/class/label, bbox)."""
    feature = {"image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
    if image_bytes is not None:
        feature["image/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))
    if box is not None:
        for name, value in zip(("ymin", "xmin", "ymax", "xmax"), box):
            feature[f"image/object/bbox/{name}"] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
    for key, value in (extra or {}).items():
        feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def png_examples(images: np.ndarray, labels: np.ndarray, boxes: np.ndarray) -> list[bytes]:
    return [example(tf.io.encode_png(im).numpy(), int(lab), box) for im, lab, box in zip(images, labels, boxes)]


def write(path: Path | str, records: list[bytes], gzip: bool = False) -> list[int]:
    """Write records; return each record's byte offset in the (uncompressed) file."""
    with tf.io.TFRecordWriter(str(path), options="GZIP" if gzip else None) as writer:
        for record in records:
            writer.write(record)
    offsets, position = [], 0
    for record in records:
        offsets.append(position)
        position += 12 + len(record) + 4
    return offsets


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def frame_header_size() -> int:
    return struct.calcsize("<QI")
