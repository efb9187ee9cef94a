"""Per-step phase timing (host clock on the CPU; CUDA events on a GPU)."""

import time

import pytest

from executor.phase_timer import PhaseTimer


def test_phases_are_the_gaps_between_marks():
    clock = PhaseTimer("cpu")
    assert not clock.cuda
    clock.mark("start")
    time.sleep(0.02)
    clock.mark("data_s")
    time.sleep(0.05)
    clock.mark("compute_s")
    clock.mark("optimizer_s")
    d = clock.durations()
    assert list(d) == ["data_s", "compute_s", "optimizer_s"]
    assert d["data_s"] == pytest.approx(0.02, abs=0.015)
    assert d["compute_s"] == pytest.approx(0.05, abs=0.015)
    assert 0 <= d["optimizer_s"] < 0.01
    assert PhaseTimer("cpu").durations() == {}
