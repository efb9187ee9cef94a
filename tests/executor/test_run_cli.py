"""`meshplan run` as users call it: the planner's plan, stop / resume, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from costmodels.hardware import cpu_threads_per_rank
from executor.host import host_cores
from planner.cli import main
from tests.executor.executor_testlib import make_plan, read_metrics, write_plan

ROOT = Path(__file__).resolve().parents[2]


def test_contract_plan_then_run_stop_and_resume(tmp_path: Path) -> None:
    pytest.importorskip("planner.commands.plan")
    plan_dir = tmp_path / "plan"
    assert main(["plan", "--model", "tiny", "--gpu", "cpu", "--gpus", "1",
                 "--global-batch", "4", "--steps", "40", "--out", str(plan_dir)]) == 0
    run = tmp_path / "run"
    cmd = ["run", str(plan_dir / "plan.yaml"), "--out", str(run), "--no-progress",
           "--override", "train.max_steps=40", "--override", "train.objective=clm",
           "--override", "layout.micro_batch_size=4", "--override", "train.precision=fp32"]
    assert main([*cmd, "--stop-after-steps", "20"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["interrupted"] and not summary["finished"]
    assert main(cmd) == 0
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_sec",
                "skipped", "skip_reason", "sample_ids", "compute_s", "optimizer_s"):
        assert key in metrics[-1], key
    assert metrics[-1]["tokens"] == 40 * 4 * 128
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"] == 20
    assert summary["predicted"]["step_time_s"] > 0  # the planner's prediction, copied in
    assert summary["mean_step_time_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["final_loss"] < summary["first_loss"]
    env = os.environ.get("OMP_NUM_THREADS", "")  # else one process uses every core
    assert summary["cpu_threads"] == (int(env) if env.isdigit() else cpu_threads_per_rank(1, host_cores()))
    assert (run / "plan.yaml").is_file()


def test_user_error_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "run",
                           str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"meshplan: error: {tmp_path / 'nope.yaml'}: plan file not found; create one with "
        "`meshplan plan ... --out DIR`"]


@pytest.mark.parametrize("extra,needle", [
    (["--override", "train.precision=fp8"], "train.precision=fp8"),
    (["--override", "train.max_stepz=3"], "max_stepz"),
    (["--inject-fault", "spike"], "--inject-fault"),
    (["--override", "data.mixture={wiki: 1.0}"], "wiki"),
    (["--stop-after-steps", "0"], "--stop-after-steps"),
])
def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  extra: list[str], needle: str) -> None:
    plan = write_plan(tmp_path, make_plan())
    rc = main(["run", str(plan), "--out", str(tmp_path / "run"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err, err


def test_checkpoint_verify_on_missing_folder(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoint", "verify", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
