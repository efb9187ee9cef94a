"""WSD branching: decays of different lengths from one stable-phase checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from costmodels.errors import MeshplanError
from costmodels.lr_schedule import LRSchedule
from executor.train import RunOptions, run_training
from tests.executor.executor_testlib import make_plan, read_metrics

QUIET = RunOptions(quiet=True, progress=False)


def wsd_plan(**continual):
    # 40 steps, warmup 3, the last 10 decay: steps 3..30 are the stable phase.
    return make_plan(
        train={"max_steps": 40, "lr": 2e-3, "schedule": "wsd", "wsd_decay_frac": 0.25,
               "warmup_steps": 3},
        data={"mixture": {"english": 1.0}},
        checkpoint={"every": 10, "keep": 5},
        continual=continual,
    )


@pytest.fixture(scope="module")
def stable_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("wsd") / "stable"
    assert run_training(wsd_plan(), run, QUIET)["finished"]
    return run


def test_two_decays_branch_from_one_stable_checkpoint(stable_run: Path, tmp_path: Path) -> None:
    stable = {r["step"]: r for r in read_metrics(stable_run)}
    summaries, branches = {}, {}
    for decay in (5, 12):
        out = tmp_path / f"decay{decay}"
        plan = wsd_plan(init_from=str(stable_run), branch_step=20, decay_steps=decay)
        summaries[decay] = run_training(plan, out, QUIET)
        branches[decay] = read_metrics(out)
    for decay, rows in branches.items():
        s = summaries[decay]
        assert s["finished"] and s["steps"] == 20 + decay and s["max_steps"] == 20 + decay
        assert [r["step"] for r in rows] == list(range(21, 21 + decay))
        # The branch starts from the stable run's exact state at step 20: model, optimizer
        # and data cursor, so its first step sees the same batch and the same loss.
        first = rows[0]
        assert first["loss"] == stable[21]["loss"]
        assert first["grad_norm"] == stable[21]["grad_norm"]
        assert first["sample_ids"] == stable[21]["sample_ids"]
        assert first["tokens"] == stable[21]["tokens"]
        # Linear decay from the stable LR to min_lr over exactly `decay` updates.
        sched = LRSchedule(lr=2e-3, max_steps=20 + decay, warmup_steps=3, schedule="wsd",
                           min_lr=2e-4, wsd_decay_steps=decay)
        assert [r["lr"] for r in rows] == [sched.at(r["step"] - 1) for r in rows]
        assert rows[-1]["lr"] == pytest.approx(2e-4)
        assert rows[0]["lr"] < stable[21]["lr"] == 2e-3
        assert s["continual"]["branch_step"] == 20
    assert branches[5][0]["loss"] == branches[12][0]["loss"]
    assert branches[5][1]["lr"] < branches[12][1]["lr"]  # the shorter decay falls faster


def test_branch_resumes_in_its_own_folder(stable_run: Path, tmp_path: Path) -> None:
    plan = wsd_plan(init_from=str(stable_run), branch_step=10, decay_steps=4)
    out = tmp_path / "b"
    run_training(plan, out, RunOptions(quiet=True, progress=False, stop_after_steps=12))
    s = run_training(plan, out, QUIET)
    assert s["resumed_from"] == 12 and s["finished"] and s["steps"] == 14
    assert [r["step"] for r in read_metrics(out)] == [11, 12, 13, 14]


def test_branch_errors(stable_run: Path, tmp_path: Path) -> None:
    with pytest.raises(MeshplanError, match=r"branch_step=40: not in the source run's stable"):
        run_training(wsd_plan(init_from=str(stable_run), branch_step=40, decay_steps=5),
                     tmp_path / "late", QUIET)
    with pytest.raises(MeshplanError, match=r"branch_step=15: .* has no checkpoint at that step"
                                            r" \(has: 40, 30, 20, 10\)"):
        run_training(wsd_plan(init_from=str(stable_run), branch_step=15, decay_steps=5),
                     tmp_path / "nockpt", QUIET)
    # A plan whose own schedule calls step 40 stable still cannot branch from a checkpoint
    # that was already decaying: the checkpoint's recorded LR is checked too.
    longer = wsd_plan(init_from=str(stable_run), branch_step=40, decay_steps=5)
    longer.train.max_steps = 100
    with pytest.raises(MeshplanError, match=r"branch_step=40: the source run's LR there was "
                                            r"0.0002, not its stable peak"):
        run_training(longer, tmp_path / "longer", QUIET)
    cosine = make_plan(train={"max_steps": 40, "schedule": "cosine"},
                       data={"mixture": {"english": 1.0}},
                       continual={"init_from": str(stable_run), "branch_step": 20,
                                  "decay_steps": 5})
    with pytest.raises(MeshplanError, match="branching needs a wsd run"):
        run_training(cosine, tmp_path / "cos", QUIET)
