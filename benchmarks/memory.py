"""Peak resident memory of a process and of the processes it starts, from /proc (Linux).

``getrusage``'s ``ru_maxrss`` is no measure of a pipeline process the benchmark starts:
Linux folds the peak RSS of the image that ``exec`` replaces into it, so a process
started from the benchmark (which holds TensorFlow, the models and the engines) reports
about the benchmark's own size, whatever it does. ``VmHWM`` is the peak of the process's
own image.
"""

from __future__ import annotations

import os
import threading


def peak_mb(pid: int | str = "self") -> float | None:
    """Peak RSS (VmHWM) of process ``pid`` in MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Process ids of the children of ``pid``, their children, and so on."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    pids = [int(child) for child in children.read().split()]
            except OSError:
                continue
            found += pids
            stack += pids
    return found


class DescendantsPeak:
    """Polls the peak RSS of this process's descendants (e.g. Beam's worker processes)
    every ``interval`` seconds in a thread, from ``start`` to ``stop``; ``largest`` is the
    largest (MB, 0 if none ran). A peak reached in a process's last ``interval`` before it
    exits is missed."""

    def __init__(self, interval: float = 0.02):
        self._interval = interval
        self._peaks: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="memory-poll", daemon=True)

    def start(self) -> DescendantsPeak:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    @property
    def largest(self) -> float:
        return max(self._peaks.values(), default=0.0)

    def _poll(self) -> None:
        me = os.getpid()
        while not self._done.wait(self._interval):
            for pid in descendants(me):
                peak = peak_mb(pid)
                if peak is not None:
                    self._peaks[pid] = max(self._peaks.get(pid, 0.0), peak)
