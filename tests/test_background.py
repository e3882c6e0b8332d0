"""Background work handed off by DoFns: order, bound, errors, timings."""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from transforms.background import BACKGROUND_NICE, Unfinished, background_pool, timed


def test_results_come_in_submission_order_and_at_most_limit_are_held():
    gates = [threading.Event() for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        unfinished = Unfinished(limit=2)
        emitted = []
        for i in range(3):
            future = pool.submit(lambda i=i: (gates[i].wait(5) and i, {}))
            if i == 2:  # a third unfinished chunk: the first must be waited for
                gates[0].set()
            emitted += list(unfinished.add(future, MIN_TIMESTAMP, GlobalWindow()))
        assert emitted == [0]
        gates[2].set()  # finishes before 1, but is emitted after it
        gates[1].set()
        drained = list(unfinished.drain())
    assert [w.value for w in drained] == [1, 2]
    assert all(w.windows == (GlobalWindow(),) and w.timestamp == MIN_TIMESTAMP for w in drained)


def test_an_error_in_the_background_is_raised_where_the_result_is_emitted():
    gate = threading.Event()

    def fail():
        gate.wait(5)
        raise ValueError("statistics failed for chunk 3")

    with ThreadPoolExecutor(1) as pool:
        unfinished = Unfinished(limit=1)
        assert list(unfinished.add(pool.submit(fail), MIN_TIMESTAMP, GlobalWindow())) == []
        gate.set()
        with pytest.raises(ValueError, match="chunk 3"):
            list(unfinished.drain())


def test_timed_adds_milliseconds_into_a_dict():
    timings = {}
    for _ in range(2):
        with timed("stage_ms", timings):
            threading.Event().wait(0.01)
    assert timings["stage_ms"] >= 18


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
def test_background_threads_run_at_the_lowest_priority_and_leave_the_callers_alone():
    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = priority()
    with background_pool(2, "test") as pool:
        assert list(pool.map(lambda _: priority(), range(4))) == [BACKGROUND_NICE] * 4
    assert BACKGROUND_NICE == 19 and priority() == before


def test_background_threads_work_where_lower_priority_is_refused(monkeypatch):
    def refuse(*args):
        raise PermissionError("setpriority refused")

    monkeypatch.setattr(os, "setpriority", refuse)
    with background_pool(1, "test") as pool:
        assert pool.submit(lambda: 42).result() == 42
