"""Plain TFRecord files of tf.train.Example with the common keys, made here from the sample."""

from __future__ import annotations

import numpy as np
import xarray as xr

from tests import records_factory as rf
from tests.conftest import run_cli
from transforms.nengo_shim import tf
from transforms.records import ExampleDecoder, decode_record
from transforms.tfrecord_io import BadRecord


def test_tfrecord_glob_with_gzip_and_a_bad_image(tmp_path, sample_images, relu_store):
    images, labels, boxes = sample_images["image"], sample_images["label"], sample_images["bbox"]
    pngs = [tf.io.encode_png(image).numpy() for image in images[:6]]
    # b.tfrecord.gz sorts after a.tfrecord: images 0-2 then a broken record then 3-5.
    with tf.io.TFRecordWriter(str(tmp_path / "a.tfrecord")) as writer:
        for i in range(3):
            writer.write(rf.example(pngs[i], int(labels[i]), boxes[i]))
    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord.gz"), options="GZIP") as writer:
        writer.write(rf.example(b"not an image", 1, boxes[0]))
        for i in range(3, 6):
            writer.write(rf.example(pngs[i], int(labels[i]), boxes[i]))
    out = tmp_path / "plain.zarr"
    assert run_cli("--input", str(tmp_path / "*.tfrecord*"), "--neuron", "relu", "--n-steps", "1",
                   "--batch-size", "4", "--output", str(out)) == 0

    ds = xr.open_zarr(out)
    assert list(ds.image_id.values) == ["a.tfrecord:0", "a.tfrecord:1", "a.tfrecord:2",
                                        "b.tfrecord.gz:0", "b.tfrecord.gz:1", "b.tfrecord.gz:2",
                                        "b.tfrecord.gz:3"]
    assert list(ds["class"].values) == [str(k) for k in range(10)]
    np.testing.assert_array_equal(ds.status.values, [1, 1, 1, 2, 1, 1, 1])
    assert "decode" in str(ds.error.values[3]) and ds.error.values[0] == ""
    assert np.isnan(ds.cam.values[3]).all() and ds.label.values[3] == -1
    good = [0, 1, 2, 4, 5, 6]
    reference = xr.open_zarr(relu_store)
    np.testing.assert_allclose(ds.cam.values[good, :, 0], reference.cam.values[:6, :, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.label.values[good], labels[:6])
    np.testing.assert_allclose(ds.boxes.values[good, 0], boxes[:6])


def test_decode_record_names_the_stage_that_failed(sample_images):
    image, box = sample_images["image"][0], sample_images["bbox"][0]
    png = tf.io.encode_png(image).numpy()
    decoder, classes, max_boxes = ExampleDecoder(), 10, 1

    index, example = decode_record((7, rf.example(png, 3, box)), decoder, classes, max_boxes)
    assert index == 7 and example.label == 3
    np.testing.assert_array_equal(example.image, image)
    np.testing.assert_allclose(example.boxes, box[None])
    failures = {
        "read: truncated frame": BadRecord("truncated frame"),
        "decode: ValueError: label 12 is outside 0..9": rf.example(png, 12, box),
        "decode: ValueError: 2 boxes, more than --max-boxes=1": rf.example(png, 3, np.stack([box, box])),
        "decode: DecodeError": b"not a tf.train.Example",
    }
    for reason, record in failures.items():
        index, failed = decode_record((7, record), decoder, classes, max_boxes)
        assert index == 7 and isinstance(failed, BadRecord) and failed.reason.startswith(reason), failed
