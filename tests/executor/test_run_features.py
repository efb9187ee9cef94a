"""Held-out evaluation, user-supplied sources, WSD schedule through a real run."""

from __future__ import annotations

import json
from pathlib import Path

from costmodels.lr_schedule import LRSchedule
from planner.cli import main
from tests.executor.executor_testlib import MICRO, make_plan, read_metrics, write_plan


def test_eval_loss_and_schedule_in_metrics(tmp_path: Path) -> None:
    plan = make_plan(train={"max_steps": 10, "eval_every": 5, "schedule": "wsd",
                            "warmup_steps": 2}, data={"heldout_docs": 16})
    path = write_plan(tmp_path, plan)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    metrics = read_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics if "eval_loss" in r] == [5, 10]
    assert metrics[-1]["eval_loss"] < metrics[4]["eval_loss"]
    sched = LRSchedule.from_train(plan.train)
    assert [r["lr"] for r in metrics] == [sched.at(s) for s in range(10)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_eval_loss"] == metrics[-1]["eval_loss"]


def test_user_sources_are_prepared_into_the_run(tmp_path: Path) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(40):
        (src / f"d{i}.txt").write_text(f"Document {i}. " + "the quick brown fox " * (i + 5))
    model = MICRO.with_(vocab=512).to_dict()
    plan = make_plan(model=model, train={"max_steps": 5},
                     data={"sources": {"fox": str(src)}, "mixture": {"fox": 1.0},
                           "heldout_docs": 0})
    path = write_plan(tmp_path, plan)
    run = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run), "--no-progress"]) == 0
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["domains"]["fox"]["docs"] == 40 and meta["vocab_size"] <= 512
    assert len(read_metrics(run)) == 5
    # A second run reuses the prepared data.
    assert main(["run", str(path), "--out", str(run), "--no-progress",
                 "--override", "train.max_steps=6"]) == 0
