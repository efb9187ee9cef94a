"""Continual runs on a 2-rank FSDP (ZeRO-3) layout through `meshplan run` (torchrun): the
source weights load before the model is sharded, and a WSD branch restores a one-process
checkpoint into the sharded layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from executor.train import RunOptions, run_training
from planner.planfile import save_plan
from tests.executor.executor_testlib import make_plan, read_metrics

ROOT = Path(__file__).resolve().parents[2]
TWO_RANKS = {"dp": 2, "sharding": "zero3", "micro_batch_size": 2, "global_batch_size": 4}


def _run_cli(plan_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHPLAN_LAUNCH_TIMEOUT_S": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "planner.cli", "run", str(plan_dir), "--out",
                           str(out), "--no-progress"], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env)


def _two_rank_plan(tmp: Path, name: str, train: dict, data: dict, continual: dict) -> Path:
    plan = make_plan(layout=TWO_RANKS, cluster={"num_gpus": 2, "gpus_per_node": 2},
                     train=train, data=data, checkpoint={"every": 0}, continual=continual)
    return save_plan(plan, tmp / name).parent


def test_continual_and_branch_on_two_ranks(english_run: Path, tmp_path: Path) -> None:
    source = read_metrics(english_run)[-1]
    plan = _two_rank_plan(
        tmp_path, "cont", {"max_steps": 2, "eval_every": 2, "eval_batches": 1},
        {"mixture": {"code": 1.0}, "heldout_docs": 16},
        {"init_from": str(english_run), "replay_fraction": 0.2})
    proc = _run_cli(plan, tmp_path / "cont-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = json.loads((tmp_path / "cont-run" / "continual" / "init.json").read_text())
    # Sharded evaluation sums in another order: equal up to float rounding.
    assert init["eval_losses"]["english"] == pytest.approx(source["eval_loss_english"],
                                                           rel=1e-6)
    assert init["mixture"] == pytest.approx({"code": 0.8, "english": 0.2})
    # WSD: a one-process stable run, branched into a 2-rank decay.
    wsd = {"max_steps": 12, "schedule": "wsd", "warmup_steps": 2, "wsd_decay_frac": 0.25}
    stable = tmp_path / "stable"
    run_training(make_plan(train=wsd, data={"mixture": {"english": 1.0}},
                           checkpoint={"every": 6}), stable,
                 RunOptions(quiet=True, progress=False))
    plan = _two_rank_plan(tmp_path, "branch", wsd, {"mixture": {"english": 1.0}},
                          {"init_from": str(stable), "branch_step": 6, "decay_steps": 3})
    proc = _run_cli(plan, tmp_path / "branch-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "branch-run")
    ref = {r["step"]: r for r in read_metrics(stable)}
    assert [r["step"] for r in rows] == [7, 8, 9]
    assert rows[0]["loss"] == pytest.approx(ref[7]["loss"], rel=1e-6)
    assert rows[-1]["lr"] == pytest.approx(1e-4)
