"""Planned jobs on a real SLURM (localhost: munged + slurmctld + slurmd started by the tests):
`meshplan launch PLAN --slurm --submit` runs the plan to the same losses as `meshplan run`,
`--status` reports the job, and a requeued job resumes with every step logged once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.slurm_cluster import SlurmCluster, missing

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.env = {}
    try:
        cluster.start()
        # the job's environment: this interpreter's bin (torchrun, meshplan) first on PATH
        cluster.env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        cluster.env["PYTHONPATH"] = str(REPO)
        yield cluster
    finally:
        cluster.stop()
    assert not any(_alive(p) for p in cluster.pids.values())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _meshplan(slurm: SlurmCluster, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "planner.cli", *argv], cwd=cwd, env=slurm.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _plan(slurm: SlurmCluster, out: Path, steps: int, every: int) -> Path:
    _meshplan(slurm, "plan", "--model", "tiny", "--gpu", "cpu", "--gpus", "2", "--gpus-per-node", "2",
              "--seq-len", "64", "--global-batch-tokens", "1024", "--sharding", "none",
              "--recompute", "none", "--out", str(out), "--override", f"train.max_steps={steps}",
              "--override", f"checkpoint.every={every}", "--override", "data.max_docs_per_domain=300",
              cwd=out.parent)
    return out / "plan.yaml"


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _submit(slurm: SlurmCluster, plan: Path) -> str:
    out = _meshplan(slurm, "launch", str(plan), "--slurm", "--submit", cwd=plan.parent).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("submitted job ")]
    assert line, out
    return line[0].split()[-1]


def test_submitted_plan_matches_meshplan_run(slurm, tmp_path):
    plan = _plan(slurm, tmp_path / "plan", steps=6, every=3)
    job = _submit(slurm, plan)
    state = slurm.wait(job)
    log = "".join(p.read_text() for p in (tmp_path / "plan").glob("slurm-*.out"))
    assert state == "COMPLETED", log[-3000:]
    status = json.loads(_meshplan(slurm, "launch", str(plan), "--status", cwd=tmp_path).stdout)
    assert status["job_id"] == job and status["state"] == "COMPLETED" and status["last_step"] == 6
    _meshplan(slurm, "run", str(plan), "--out", str(tmp_path / "local"), cwd=tmp_path)
    on_slurm, local = _steps(tmp_path / "plan" / "run"), _steps(tmp_path / "local")
    assert [r["step"] for r in on_slurm] == list(range(1, 7))
    for a, b in zip(on_slurm, local, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(b["loss"])), (a["step"], a["loss"], b["loss"])


def test_requeued_job_resumes_with_every_step_once(slurm, tmp_path):
    steps = 16
    plan = _plan(slurm, tmp_path / "plan", steps=steps, every=3)
    job = _submit(slurm, plan)
    run = tmp_path / "plan" / "run"
    deadline = time.time() + 240
    while time.time() < deadline:  # requeue once a checkpoint exists and training has moved on
        done = _steps(run) if (run / "metrics.jsonl").is_file() else []
        if done and done[-1]["step"] >= 5:
            break
        assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job_state(job)
        time.sleep(0.3)
    else:
        raise AssertionError("the job never reached step 5")
    slurm.run("scontrol", "requeue", job)
    # SLURM holds a requeued batch job back (its begin time moves ~2 minutes on); make it
    # eligible now, as a preempted job's would be once resources free up.
    for _ in range(50):
        if slurm.job_state(job) == "PENDING":
            break
        time.sleep(0.2)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = slurm.wait(job, timeout=400)
    log = "".join(p.read_text() for p in (tmp_path / "plan").glob("slurm-*.out"))
    assert state == "COMPLETED", log[-3000:]
    recs = _steps(run)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))  # every step once
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    saved = [e["step"] for e in events[:events.index(resumes[0])] if e.get("event") == "checkpoint"]
    assert len(resumes) == 1 and resumes[0]["step"] == saved[-1] >= 3  # the newest checkpoint
