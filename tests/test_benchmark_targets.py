"""The benchmark's targets table judges the measured values, not their printed roundings."""

from __future__ import annotations

from benchmarks.run import goal


def test_a_target_is_met_by_the_value_itself():
    assert goal("end to end", 0.4996, ".2f", ">=", 0.5) == ("end to end", "0.50", ">= 0.50", "no")
    assert goal("share", 0.15, ".0%", "<=", 0.15)[3] == "yes"
    assert goal("share", 0.1501, ".0%", "<=", 0.15)[1:] == ("15%", "<= 15%", "no")
    assert goal("memory", 1.1, ".3f", "<", 1.1)[3] == "no"
