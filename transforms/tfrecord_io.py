"""Read TFRecord files record by record, keeping every good record of a damaged file.

A TFRecord is ``length (uint64) | masked crc32c(length) | data | masked crc32c(data)``.
``tf.data`` stops a whole file at the first bad byte; this reader checks each frame
itself: a record whose data is corrupt or cut short is reported as a ``BadRecord`` and
reading goes on with the next one; only a corrupt length header (after which the frames
cannot be found again) ends the file, with a ``FileUnreadable`` error.

Files are opened with ``tf.io.gfile`` (local paths, ``gs://`` and the other file systems
TensorFlow knows); gzip-compressed files are recognized by their magic bytes.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import google_crc32c

from transforms.nengo_shim import tf

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be read, and why."""

    reason: str


class FileUnreadable(IOError):
    """The rest of a file cannot be read (its frames are lost)."""


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def is_gzip(path: str) -> bool:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _frames(stream: BinaryIO) -> Iterator[bytes | BadRecord]:
    index = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            yield BadRecord(f"record {index}: file ends inside the record's header (truncated)")
            return
        length, length_crc = struct.unpack("<QI", header)
        if _masked_crc(header[:8]) != length_crc:
            raise FileUnreadable(f"record {index}: corrupt length header; the rest of the file is lost")
        data = stream.read(length)
        footer = stream.read(4)
        if len(data) < length or len(footer) < 4:
            yield BadRecord(f"record {index}: file ends inside the record (truncated)")
            return
        if _masked_crc(data) != struct.unpack("<I", footer)[0]:
            yield BadRecord(f"record {index}: data checksum mismatch (corrupt record)")
        else:
            yield data
        index += 1


def read_tfrecord(path: str, compressed: bool) -> Iterator[bytes | BadRecord]:
    """Every record of ``path`` in order: its bytes, or a BadRecord.

    Raises FileUnreadable where the remaining frames cannot be found (a corrupt length
    header, a damaged gzip stream).
    """
    with tf.io.gfile.GFile(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            yield from _frames(stream)
        except (EOFError, OSError, zlib.error) as err:
            if isinstance(err, FileUnreadable):
                raise
            raise FileUnreadable(f"compressed stream damaged: {err}") from err


@dataclass(frozen=True)
class FileScan:
    """What a scan of a file found: records framed (bad ones included), and the error
    that ended it early ("" if it read to the end)."""

    n_records: int
    error: str


def scan_tfrecord(path: str, compressed: bool) -> FileScan:
    """Count the records of a file (checking every frame, as the workers will read it)."""
    n = 0
    try:
        for _ in read_tfrecord(path, compressed):
            n += 1
    except FileUnreadable as err:
        return FileScan(n, f"unreadable after {n} records: {err}")
    except (tf.errors.OpError, OSError) as err:
        return FileScan(n, f"cannot read: {err}")
    return FileScan(n, "" if n else "empty file: no records")
