"""Corrupt and malformed inputs, made here: the run completes, every failure is listed,
no good record is lost, and counts reconcile."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tests import records_factory as rf
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def damaged_store(tmp_path_factory, sample_images) -> str:
    """One run over a directory of good, damaged and malformed files (rate neurons, 1 step)."""
    folder = tmp_path_factory.mktemp("damaged")
    images, labels, boxes = sample_images["image"], sample_images["label"], sample_images["bbox"]
    good = rf.png_examples(images, labels, boxes)  # sample images 0..23, in order

    # a_good: images 0-3.
    rf.write(folder / "a_good.tfrecord", good[0:4])
    # b_flipped: images 4-7, a byte of record 1's data flipped.
    offsets = rf.write(folder / "b_flipped.tfrecord", good[4:8])
    rf.flip_byte(folder / "b_flipped.tfrecord", offsets[1] + rf.frame_header_size() + 40)
    # c_header: images 8-11, record 2's length header corrupted: records 2, 3 are lost.
    offsets = rf.write(folder / "c_header.tfrecord", good[8:12])
    rf.flip_byte(folder / "c_header.tfrecord", offsets[2] + 1)
    # d_truncated: images 12-15, cut inside record 3.
    offsets = rf.write(folder / "d_truncated.tfrecord", good[12:16])
    path = folder / "d_truncated.tfrecord"
    path.write_bytes(path.read_bytes()[: offsets[3] + 30])
    # e_empty: no records at all.
    (folder / "e_empty.tfrecord").write_bytes(b"")
    # f_malformed: image 16 good, then: not an image, no image feature, raw pixels of the
    # wrong size, a label out of range, then image 17 good.
    malformed = [
        good[16],
        rf.example(b"\x89PNG but not really", 3, boxes[0]),
        rf.example(None, 3, boxes[0]),
        rf.example(bytes(100), 3, boxes[0], {"image/height": 64, "image/width": 64, "image/channels": 1}),
        rf.example(rf.tf.io.encode_png(images[0]).numpy(), 12, boxes[0]),
        good[17],
    ]
    rf.write(folder / "f_malformed.tfrecord", malformed)
    # g_gzip: images 18-21 compressed; h_gzip_cut: images 22-23 compressed, then cut.
    rf.write(folder / "g_gzip.tfrecord.gz", good[18:22], gzip=True)
    rf.write(folder / "h_gzip_cut.tfrecord.gz", good[22:24], gzip=True)
    cut = folder / "h_gzip_cut.tfrecord.gz"
    cut.write_bytes(cut.read_bytes()[:-12])

    out = folder / "out.zarr"
    code = run_cli("--input", str(folder / "*.tfrecord*"), "--neuron", "relu", "--n-steps", "1",
                   "--images-per-chunk", "5", "--batch-size", "4", "--output", str(out))
    assert code == 0
    return str(out)


@pytest.fixture(scope="module")
def damaged_run(damaged_store) -> xr.Dataset:
    return xr.open_zarr(damaged_store).load()


def test_every_record_is_done_or_listed_and_counts_reconcile(damaged_run):
    ds = damaged_run
    files = [p.rsplit("/", 1)[-1] for p in ds.file_path.values]
    assert files == ["a_good.tfrecord", "b_flipped.tfrecord", "c_header.tfrecord", "d_truncated.tfrecord",
                     "e_empty.tfrecord", "f_malformed.tfrecord", "g_gzip.tfrecord.gz", "h_gzip_cut.tfrecord.gz"]
    np.testing.assert_array_equal(ds.file_n_records.values[:7], [4, 4, 2, 4, 0, 6, 4])
    assert ds.file_n_records.values.sum() == ds.sizes["image"]
    assert set(np.unique(ds.status.values)) <= {1, 2}
    assert (ds.status == 1).sum() + (ds.status == 2).sum() == ds.sizes["image"]
    errors = dict(zip(files, ds.file_error.values))
    assert "corrupt length header" in errors["c_header.tfrecord"] and "after 2 records" in errors["c_header.tfrecord"]
    assert "empty file" in errors["e_empty.tfrecord"]
    assert errors["a_good.tfrecord"] == errors["b_flipped.tfrecord"] == ""

    def status_of(file: str) -> list[int]:
        return list(ds.status.values[ds.source_file.str.endswith(file).values])

    def errors_of(file: str) -> list[str]:
        return [str(e) for e in ds.error.values[ds.source_file.str.endswith(file).values]]

    assert status_of("a_good.tfrecord") == [1, 1, 1, 1]
    assert status_of("b_flipped.tfrecord") == [1, 2, 1, 1]
    assert "checksum mismatch" in errors_of("b_flipped.tfrecord")[1]
    assert status_of("c_header.tfrecord") == [1, 1]
    assert status_of("d_truncated.tfrecord") == [1, 1, 1, 2]
    assert "truncated" in errors_of("d_truncated.tfrecord")[3]
    assert status_of("f_malformed.tfrecord") == [1, 2, 2, 2, 2, 1]
    reasons = errors_of("f_malformed.tfrecord")
    assert "decode" in reasons[1]
    assert "missing feature 'image/encoded'" in reasons[2]
    assert "raw image has 100 bytes, not 64x64x1" in reasons[3]
    assert "label 12 is outside 0..9" in reasons[4]
    assert status_of("g_gzip.tfrecord.gz") == [1, 1, 1, 1]
    # The cut gzip stream: what could be read is kept, the damage is listed on the file.
    assert "compressed stream damaged" in errors["h_gzip_cut.tfrecord.gz"]
    assert set(status_of("h_gzip_cut.tfrecord.gz")) <= {1}
    failed = ds.status.values == 2
    assert (ds.error.values[failed] != "").all() and (ds.error.values[~failed] == "").all()
    assert np.isnan(ds.cam.values[failed]).all() and (ds.label.values[failed] == -1).all()


def test_no_good_record_is_lost(damaged_run, relu_store):
    """Every readable record's CAM equals the clean run's CAM of the same sample image."""
    ds = damaged_run
    reference = xr.open_zarr(relu_store).cam.isel(timestep=0).values
    # Sample image index of each store image (None where the record is damaged/malformed).
    expected = {"a_good": [0, 1, 2, 3], "b_flipped": [4, None, 6, 7], "c_header": [8, 9],
                "d_truncated": [12, 13, 14, None], "f_malformed": [16, None, None, None, None, 17],
                "g_gzip": [18, 19, 20, 21]}
    for stem, sample_indices in expected.items():
        rows = np.flatnonzero(ds.source_file.str.contains(stem).values)
        for row, index in zip(rows, sample_indices):
            if index is not None:
                np.testing.assert_allclose(ds.cam.values[row, :, 0], reference[index], rtol=1e-5, atol=1e-5)


def test_verify_accepts_a_store_whose_failures_are_listed(damaged_store, capsys):
    from pipeline.cli import main

    assert main(["verify", damaged_store, "--deep"]) == 0
    assert "OK" in capsys.readouterr().out
