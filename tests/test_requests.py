"""Errors in the request itself stop before any work, with one clear message."""

from __future__ import annotations

import pytest

from tests import records_factory as rf
from tests.conftest import run_cli
from transforms.nengo_shim import tf_keras


@pytest.fixture(scope="module")
def plain_tfrecord(tmp_path_factory, sample_images) -> str:
    path = tmp_path_factory.mktemp("plain") / "digits.tfrecord"
    rf.write(path, rf.png_examples(sample_images["image"][:2], sample_images["label"][:2], sample_images["bbox"][:2]))
    return str(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "/nowhere/*.tfrecord"], "/nowhere/*.tfrecord: no file matches"),
        (["--image-key", "picture"], "no Image feature 'picture'"),
        (["--split", "train"], "no split 'train' (has ['test'])"),
        (["--scaling", "mean"], "--scaling mean needs --mean"),
        (["--scaling", "keras", "--keras-app", "nope"], "no tf_keras.applications.nope"),
        (["--cam-threshold", "0"], "--cam-threshold must be in (0, 1]"),
        (["--resume"], "nothing to resume"),
        (["--model", "/nowhere/model.h5"], "/nowhere/model.h5: no such model file"),
    ],
)
def test_request_errors_stop_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "never.zarr"
    assert run_cli(*args, "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_unknown_key_in_plain_tfrecords(plain_tfrecord, tmp_path, capsys):
    out = tmp_path / "never.zarr"
    assert run_cli("--input", plain_tfrecord, "--image-key", "img/png", "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert f"{plain_tfrecord}: records have no feature 'img/png'" in err and "image/encoded" in err
    assert not out.exists()


@pytest.mark.parametrize("option", ["--n-steps", "--batch-size", "--limit"])
def test_counts_below_one_are_refused_by_the_parser(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(option, "0")
    assert exit_info.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def _shared_layer(inputs):
    twice = tf_keras.layers.Conv2D(1, 3, padding="same", activation="relu", name="twice")
    return twice(twice(inputs))


def _dense_over_rows(inputs):
    x = tf_keras.layers.Reshape((62 * 62, 4))(tf_keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    return tf_keras.layers.Reshape((62, 62, 3))(tf_keras.layers.Dense(3, activation="relu")(x))


@pytest.mark.parametrize("body, message", [
    (_shared_layer, "NengoDL's converter cannot convert a layer used more than once: 'twice'"),
    (_dense_over_rows, "NengoDL's converter cannot convert this model (ValidationError: Ensemble.bias"),
])
def test_a_model_nengo_dls_converter_cannot_convert_is_refused_naming_the_file(body, message, tmp_path, capsys):
    """Models that pass the head check but not the converter (a layer called twice; a Dense
    over the rows of a rank-3 tensor), whose own errors name no file."""
    inputs = tf_keras.Input((64, 64, 1))
    x = tf_keras.layers.Conv2D(4, 3, activation="relu", name="features")(body(inputs))
    model_path = tmp_path / "unconvertible.h5"
    outputs = tf_keras.layers.Dense(10, name="out")(tf_keras.layers.GlobalAveragePooling2D()(x))
    tf_keras.Model(inputs, outputs).save(model_path)
    out = tmp_path / "never.zarr"
    assert run_cli("--model", str(model_path), "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert f"{model_path}: {message}" in err and err.count("\n") == 1
    assert not out.exists()
