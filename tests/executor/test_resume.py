"""Exact resume: stop at step 20, resume to 40, bit-identical to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.cli import main
from tests.executor.executor_testlib import make_plan, read_metrics, write_plan


@pytest.mark.parametrize("objective", ["clm", "mlm", "fim"])
def test_stop_and_resume_is_bit_identical(tmp_path: Path, objective: str) -> None:
    plan_path = write_plan(tmp_path, make_plan(checkpoint={"every": 0}))
    base = ["run", str(plan_path), "--no-progress", "--override", "train.max_steps=40",
            "--override", f"train.objective={objective}", "--override", "train.precision=fp32"]
    full, parted = tmp_path / "full", tmp_path / "parted"
    assert main([*base, "--out", str(full)]) == 0
    assert main([*base, "--out", str(parted), "--stop-after-steps", "20"]) == 0
    first = read_metrics(parted)
    assert [r["step"] for r in first] == list(range(1, 21))
    assert main([*base, "--out", str(parted)]) == 0
    a, b = read_metrics(full), read_metrics(parted)
    assert [r["step"] for r in b] == list(range(1, 41))  # each step exactly once
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"], ra["step"]  # bit-identical, not approximately
        assert ra["grad_norm"] == rb["grad_norm"]
        assert ra["sample_ids"] == rb["sample_ids"]
        assert ra["lr"] == rb["lr"]
    assert a[-1]["loss"] < a[0]["loss"]


def test_resume_after_more_steps_truncates_metrics(tmp_path: Path) -> None:
    """A crash after a checkpoint leaves extra metric lines; the resume drops them."""
    plan_path = write_plan(tmp_path, make_plan(checkpoint={"every": 5}))
    run = tmp_path / "run"
    base = ["run", str(plan_path), "--no-progress", "--out", str(run)]
    assert main([*base, "--override", "train.max_steps=12", "--stop-after-steps", "12"]) == 0
    # Simulate the crash: drop the step-12 checkpoint so the newest whole one is step 10.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000012")
    assert main([*base, "--override", "train.max_steps=12"]) == 0
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, 13))
