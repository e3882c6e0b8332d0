"""The garbage collector skips the objects a process built at start-up, and only those."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_freezing_skips_objects_alive_then_and_still_frees_later_garbage():
    code = """
import gc
from transforms.gc_tuning import freeze_startup_objects
kept = [[i] for i in range(10000)]
tracked = len(gc.get_objects())
first = freeze_startup_objects()
frozen = gc.get_freeze_count()
cycle = []; cycle.append(cycle); del cycle  # garbage made after the freeze
freed = gc.collect()
second = freeze_startup_objects()
print(first, frozen >= tracked, len(gc.get_objects()) < 1000, freed >= 1, second, gc.get_freeze_count() == frozen)
"""
    assert _run(code) == ["True", "True", "True", "True", "False", "True"]


def test_a_run_freezes_the_launchers_imports(tmp_path):
    code = """
import gc
from pipeline.cli import main
code = main(["run", "--limit", "2", "--n-steps", "2", "--output", sys.argv[1]])
print(code, gc.get_freeze_count() > 100000, len(gc.get_objects()) < gc.get_freeze_count() / 2)
"""
    assert _run("import sys\n" + code, str(tmp_path / "t.zarr"))[-3:] == ["0", "True", "True"]
