"""Batch arithmetic, LR advice and the shared LR-schedule formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from costmodels.errors import MeshplanError
from costmodels.lr_schedule import LRSchedule, lr_at, lr_curve
from planner import schedule_advice as sa
from planner.planfile import TrainSection


@pytest.mark.parametrize(
    "text,value",
    [("4096", 4096), ("16M", 16e6), ("16Mi", 16 * 2**20), ("1.5T", 1.5e12), ("200B", 200e9),
     ("3.8e25", 3.8e25), ("2k", 2000), (7, 7.0)],
)
def test_parse_count(text, value):
    assert sa.parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "12X", "1e999"])
def test_parse_count_rejects(text):
    with pytest.raises(MeshplanError):
        sa.parse_count(text, "--x")


def test_tokens_per_step_and_solve_accum():
    assert sa.tokens_per_step(2, 4, 8, 1024) == 2 * 4 * 8 * 1024
    # LLaMA-3 405B: 16M tokens = 2048 x 8192 (Dubey et al. 2024 §3.4.1); dp = 128, micro 1.
    bp = sa.solve_grad_accum(16 * 2**20, 8192, micro_batch=1, dp=128)
    assert (bp.grad_accum, bp.global_batch, bp.tokens) == (16, 2048, 16 * 2**20)
    assert bp.deviation_pct == 0
    # Not a multiple: nearest accumulation, deviation reported.
    bp = sa.solve_grad_accum(10_000, 1000, micro_batch=3, dp=1)
    assert bp.grad_accum == 3 and bp.tokens == 9000
    assert bp.deviation_pct == pytest.approx(-10.0)
    with pytest.raises(MeshplanError, match="dp"):
        sa.tokens_per_step(1, 0, 1, 128)


def test_max_lr_anchors_and_interpolation():
    assert sa.recommend_max_lr(7e9) == pytest.approx(3e-4)
    assert sa.recommend_max_lr(13e9) == pytest.approx(1e-4)
    assert sa.recommend_max_lr(70e9) == pytest.approx(3e-5)
    # Log-log interpolation: at the geometric mean of two anchors, the geometric mean LR.
    mid = math.sqrt(7e9 * 13e9)
    assert sa.recommend_max_lr(mid) == pytest.approx(math.sqrt(3e-4 * 1e-4))
    assert sa.recommend_max_lr(1e6) == pytest.approx(3e-4)  # flat below 7B
    assert sa.recommend_max_lr(405e9) == pytest.approx(3e-5)  # flat from 70B
    sizes = np.logspace(9, 12, 50)
    lrs = [sa.recommend_max_lr(n) for n in sizes]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_recommend_lr_warmup_and_schedule():
    adv = sa.recommend_lr(8e9, 5000)
    assert adv.schedule == "cosine" and adv.warmup_steps == 100  # 2% below 10k steps
    adv = sa.recommend_lr(8e9, 100_000, length_known=False)
    assert adv.schedule == "wsd" and adv.warmup_steps == 1000  # 1% from 10k steps
    assert adv.min_lr == pytest.approx(adv.max_lr / 10)
    curve = adv.curve()
    assert curve.shape == (100_000,) and curve.max() == pytest.approx(adv.max_lr)
    assert sa.recommend_lr(8e9, 10, continual=True).schedule == "wsd"


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
@pytest.mark.parametrize("steps,warmup,frac", [(1, 0, 0.2), (10, 3, 0.2), (100, 0, 0.3),
                                               (257, 20, 0.0), (50, 50, 0.5), (40, 5, 1.0)])
def test_curve_equals_pointwise(schedule, steps, warmup, frac):
    curve = lr_curve(1e-3, steps, warmup_steps=warmup, schedule=schedule, min_lr=1e-5,
                     wsd_decay_frac=frac)
    points = [lr_at(s, 1e-3, steps, warmup_steps=warmup, schedule=schedule, min_lr=1e-5,
                    wsd_decay_frac=frac) for s in range(steps)]
    np.testing.assert_allclose(curve, points, rtol=1e-12, atol=0)
    assert np.all(curve > 0) and np.all(curve <= 1e-3 * (1 + 1e-12))


def test_schedule_semantics():
    lr, T, W = 1e-3, 100, 10
    assert lr_at(0, lr, T, warmup_steps=W) == pytest.approx(lr / W)
    assert lr_at(W - 1, lr, T, warmup_steps=W) == pytest.approx(lr)
    # cosine: full LR right after warmup, min_lr (default lr/10) at the last update
    assert lr_at(W, lr, T, warmup_steps=W) == pytest.approx(lr)
    assert lr_at(T - 1, lr, T, warmup_steps=W) == pytest.approx(lr / 10)
    mid = W + (T - 1 - W) / 2
    assert lr_at(int(mid), lr, T, warmup_steps=W) == pytest.approx(
        lr / 10 + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * (int(mid) - W) / (T - 1 - W)))
    )
    # WSD: stable until the last 20% of updates, then linear to min_lr
    wsd = lr_curve(lr, T, warmup_steps=W, schedule="wsd", min_lr=0.0, wsd_decay_frac=0.2)
    assert np.all(wsd[W:80] == lr)
    assert wsd[80] == pytest.approx(lr * (1 - 1 / 20))
    assert wsd[-1] == pytest.approx(0.0)
    assert np.all(np.diff(wsd[80:]) < 0)
    # constant
    assert lr_at(T - 1, lr, T, warmup_steps=W, schedule="constant") == lr
    # past the end: final value kept
    assert lr_at(10 * T, lr, T, warmup_steps=W) == pytest.approx(lr / 10)
    with pytest.raises(MeshplanError, match="schedule"):
        lr_at(0, lr, T, schedule="linear")


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedule_matches_plan_train_section(schedule):
    tr = TrainSection(max_steps=300, lr=6e-4, schedule=schedule, warmup_frac=0.02)
    sched = LRSchedule.from_train(tr)
    assert sched.warmup_steps == tr.resolved_warmup_steps == 6
    assert sched.final_lr == pytest.approx(tr.resolved_min_lr) == pytest.approx(6e-5)
    curve = sched.curve()
    assert curve[5] == pytest.approx(6e-4)
    if schedule != "constant":
        assert curve[-1] == pytest.approx(6e-5)
    tr2 = TrainSection(max_steps=300, lr=6e-4, schedule=schedule, warmup_steps=25, min_lr=0.0)
    assert LRSchedule.from_train(tr2).warmup_steps == 25
    assert LRSchedule.from_train(tr2).at(24) == pytest.approx(6e-4)


def test_steps_for_tokens():
    assert sa.steps_for_tokens(1e9, 4 * 2**20) == math.ceil(1e9 / (4 * 2**20))
    with pytest.raises(MeshplanError):
        sa.steps_for_tokens(0, 10)
