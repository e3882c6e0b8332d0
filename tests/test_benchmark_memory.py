"""The benchmark's memory figures: each process's own peak, not its parent's."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from benchmarks.memory import DescendantsPeak, peak_mb

CHILD = "import time; block = bytearray(150 * 2**20); [block.__setitem__(i, 1) for i in range(0, len(block), 4096)]; time.sleep(0.5)"


def test_a_childs_peak_is_its_own_allocation_not_its_parents_size():
    ballast = np.ones(400 * 2**20 // 8)  # this process holds 400 MB more than the child ever does
    assert peak_mb() >= 400
    workers = DescendantsPeak(interval=0.01).start()
    subprocess.run([sys.executable, "-c", CHILD], check=True)
    workers.stop()
    assert 150 <= workers.largest < 300, workers.largest
    assert ballast[-1] == 1.0
