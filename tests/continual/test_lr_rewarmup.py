"""Re-warmup, LR fraction and WSD branch curves of `costmodels.lr_schedule`."""

from __future__ import annotations

import numpy as np
import pytest

from costmodels.errors import MeshplanError
from costmodels.lr_schedule import (
    LRSchedule,
    branch_schedule,
    continual_schedule,
    lr_at,
    lr_curve,
)
from planner.planfile import TrainSection


def test_defaults_unchanged() -> None:
    for kind in ("cosine", "wsd", "constant"):
        old = [lr_at(s, 1e-3, 50, warmup_steps=5, schedule=kind) for s in range(50)]
        new = [lr_at(s, 1e-3, 50, warmup_steps=5, schedule=kind, warmup_start_lr=0.0,
                     wsd_decay_steps=None) for s in range(50)]
        assert old == new
        assert lr_curve(1e-3, 50, warmup_steps=5, schedule=kind).tolist() == pytest.approx(old)
        assert old[0] == 1e-3 * 1 / 5 and old[4] == 1e-3


def test_rewarmup_from_a_start_lr_and_explicit_decay() -> None:
    s = LRSchedule(lr=1e-3, max_steps=30, warmup_steps=4, schedule="wsd", min_lr=1e-4,
                   wsd_decay_steps=7, warmup_start_lr=1e-4)
    curve = s.curve()
    assert np.array_equal(curve, np.array([s.at(i) for i in range(30)]))
    assert curve[0] == pytest.approx(1e-4 + 0.9e-3 / 4)
    assert curve[3] == pytest.approx(1e-3)
    assert s.decay_steps == 7
    assert curve[22] == 1e-3 and curve[23] < 1e-3  # decay = the last 7 updates
    assert curve[-1] == pytest.approx(1e-4)
    with pytest.raises(MeshplanError, match="wsd_decay_steps"):
        LRSchedule(lr=1e-3, max_steps=10, warmup_steps=1, wsd_decay_steps=11)
    with pytest.raises(MeshplanError, match="warmup_start_lr"):
        LRSchedule(lr=1e-3, max_steps=10, warmup_steps=1, warmup_start_lr=1.0)


def test_continual_schedule_scales_peak_and_floor() -> None:
    train = TrainSection(lr=3e-4, max_steps=100, warmup_steps=10, schedule="cosine")
    s = continual_schedule(train, lr_fraction=0.25)
    assert s.lr == pytest.approx(7.5e-5) and s.final_lr == pytest.approx(7.5e-6)
    curve = s.curve()
    assert curve[0] == pytest.approx(7.5e-5 / 10) and curve.max() == pytest.approx(7.5e-5)
    assert curve[-1] == pytest.approx(7.5e-6)
    assert continual_schedule(train).curve().tolist() == LRSchedule.from_train(
        train).curve().tolist()
    with pytest.raises(MeshplanError, match="lr_fraction"):
        continual_schedule(train, 0.0)


def test_branch_schedule_follows_the_stable_run_then_decays() -> None:
    train = TrainSection(lr=1e-3, max_steps=1000, warmup_steps=20, schedule="wsd",
                         wsd_decay_frac=0.2)
    base = LRSchedule.from_train(train)
    b = branch_schedule(train, branch_step=500, decay_steps=50)
    assert b.max_steps == 550
    assert [b.at(i) for i in range(500)] == [base.at(i) for i in range(500)]
    tail = [b.at(i) for i in range(500, 550)]
    assert tail[0] == pytest.approx(1e-3 - 0.9e-3 / 50)
    assert tail[-1] == pytest.approx(1e-4)
    assert all(x > y for x, y in zip(tail, tail[1:], strict=False))
    assert branch_schedule(train, 800, 10).max_steps == 810  # last stable step
    with pytest.raises(MeshplanError, match="not in the source run's stable phase"):
        branch_schedule(train, 801, 10)
    with pytest.raises(MeshplanError, match="not in the source run's stable phase"):
        branch_schedule(train, 10, 10)  # still warming up
