"""Make TFRecord files of tf.train.Example records from the sample, and damage them."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from pipeline.sample import example_record
from transforms.nengo_shim import tf


def example(image_bytes: bytes | None, label: int, box: np.ndarray | None, extra: dict | None = None) -> bytes:
    """A tf.train.Example with the common keys; without image/encoded if image_bytes is None."""
    record = tf.train.Example.FromString(
        example_record(image_bytes or b"", label, np.zeros((0, 4)) if box is None else box, extra)
    )
    if image_bytes is None:
        del record.features.feature["image/encoded"]
    return record.SerializeToString()


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
