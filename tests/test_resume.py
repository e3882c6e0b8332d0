"""Runs killed part-way and resumed give the store of a clean run; verify tells the difference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import zarr

from tests.conftest import run_cli

ARGS = ["--limit", "48", "--n-steps", "8", "--images-per-chunk", "4", "--batch-size", "4"]


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("clean") / "clean.zarr")
    assert run_cli(*ARGS, "--output", out) == 0
    return out


def _chunks_done(store: str) -> int:
    try:
        return int((zarr.open_array(os.path.join(store, "status"), mode="r")[:] != 0).sum()) // 4
    except Exception:  # noqa: BLE001 - not set up yet
        return 0


def _kill_when_part_done(command: list[str], store: str, log_path) -> None:
    """Start ``command``, and SIGKILL its whole process group once some chunks are done."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not 0 < _chunks_done(store) < 12:
            assert process.poll() is None, f"the run ended before it could be killed: {open(log_path).read()}"
            assert time.monotonic() < deadline, "no chunk was done in time"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _assert_same_store(clean: str, other: str) -> None:
    a, b = xr.open_zarr(clean).load(), xr.open_zarr(other).load()
    xr.testing.assert_identical(a, b)
    assert a.attrs == b.attrs


def test_killed_command_resumes_to_the_clean_store(clean_store, tmp_path, capsys):
    from pipeline.cli import main

    store = str(tmp_path / "killed.zarr")
    command = [sys.executable, "-m", "pipeline", "run", *ARGS, "--output", store]
    _kill_when_part_done(command, store, tmp_path / "run.log")
    done_before = _chunks_done(store)
    assert 0 < done_before < 12

    assert main(["verify", store]) == 1
    assert "never written" in capsys.readouterr().err
    assert run_cli(*ARGS, "--output", store) == 2  # neither --overwrite nor --resume
    assert "--resume" in capsys.readouterr().err

    assert run_cli(*ARGS, "--output", store, "--resume") == 0
    _assert_same_store(clean_store, store)
    assert main(["verify", store, "--deep"]) == 0


@pytest.mark.slow
def test_killed_worker_process_then_resume(clean_store, tmp_path):
    """Kill one of two worker processes mid-run: the run fails (or is stopped), resume
    completes it."""
    store = str(tmp_path / "worker_killed.zarr")
    command = [sys.executable, "-m", "pipeline", "run", *ARGS, "--output", store,
               "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not 0 < _chunks_done(store) < 12:
            assert process.poll() is None, "the run ended before a worker could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        workers = subprocess.run(["pgrep", "-f", "-g", str(process.pid), "sdk_worker_main"],
                                 capture_output=True, text=True).stdout.split()
        assert workers, "no worker process found"
        os.kill(int(workers[0]), signal.SIGKILL)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a runner that waits for the lost worker: stop it
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert run_cli(*ARGS, "--output", store, "--resume") == 0
    _assert_same_store(clean_store, store)


def test_resume_refuses_a_store_made_by_another_request(clean_store, capsys):
    assert run_cli(*ARGS[:-2], "--batch-size", "2", "--output", clean_store, "--resume") == 0  # batch size may differ
    # so may the chunk size's default, which follows the batch size: the store's is kept
    assert run_cli(*ARGS[:4], *ARGS[-2:], "--output", clean_store, "--resume") == 0
    assert run_cli(*ARGS[:4], "--batch-size", "6", "--output", clean_store, "--resume") == 0
    capsys.readouterr()
    assert run_cli(*ARGS, "--scale-firing-rates", "50", "--output", clean_store, "--resume") == 2
    err = capsys.readouterr().err
    assert "different request" in err and "scale_firing_rates" in err
    assert (xr.open_zarr(clean_store).status.values == 1).all()
    np.testing.assert_array_equal(xr.open_zarr(clean_store).attrs["scale_firing_rates"], 100.0)
