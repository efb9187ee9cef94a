"""`meshplan run` on multi-rank plans: torchrun launch, cross-layout resume, a SIGKILLed
rank, and misconfigured layouts that fail before any process starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from costmodels.hardware import cpu_threads_per_rank
from costmodels.presets import PRESETS
from executor.host import host_cores
from planner.cli import main as cli_main
from planner.planfile import plan_from_dict, save_plan

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--override", "train.precision=fp32", "--no-progress"]


def _plan(tmp: Path, **layout) -> Path:
    lay = {"dp": 2, "sharding": "zero3", "micro_batch_size": 2, "global_batch_size": 8,
           **layout}
    world = lay.get("dp", 1) * lay.get("tp", 1) * lay.get("pp", 1) * lay.get("cp", 1)
    plan = plan_from_dict({
        "model": PRESETS["tiny-mha"].with_(seq_len=64).to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": world},
        "layout": lay,
        "train": {"precision": "fp32", "max_steps": 10, "lr": 1e-3, "warmup_steps": 0,
                  "seed": 7},
        "checkpoint": {"every": 5, "keep": 3},
        "data": {"max_docs_per_domain": 200},
    })
    return save_plan(plan, tmp / "plan")


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    full_env = {**os.environ, "MESHPLAN_LAUNCH_TIMEOUT_S": str(int(timeout - 10)),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "planner.cli", "run", *args, *COMMON],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=full_env)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


ONE_RANK = ["--override", "layout.dp=1", "--override", "cluster.num_gpus=1",
            "--override", "layout.sharding=none"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The uninterrupted one-process run of the plan (10 steps)."""
    tmp = tmp_path_factory.mktemp("ref")
    plan = _plan(tmp)
    proc = _run(str(plan), "--out", str(tmp / "run"), *ONE_RANK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return plan, _metrics(tmp / "run")


def _close(a: list[dict], b: list[dict], steps: range) -> None:
    la = {r["step"]: r["loss"] for r in a}
    lb = {r["step"]: r["loss"] for r in b}
    for s in steps:
        assert abs(la[s] - lb[s]) <= 1e-4 * abs(lb[s]), (s, la[s], lb[s])


@pytest.mark.timeout(300)
def test_fsdp_two_ranks_matches_one_process_and_logs_comm(reference, tmp_path):
    plan, ref = reference
    run = tmp_path / "run"
    proc = _run(str(plan), "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _metrics(run)
    assert [r["step"] for r in got] == list(range(1, 11))  # rank 0 alone writes
    _close(got, ref, range(1, 11))
    last = got[-1]
    for kind, pred in last["comm_bytes_predicted"].items():
        assert abs(last["comm_bytes"][kind] - pred) <= max(0.05 * pred, 64), kind
    # The ranks split the host's cores (the thread count the cost model assumes).
    summary = json.loads((run / "summary.json").read_text())
    env = os.environ.get("OMP_NUM_THREADS", "")
    assert summary["cpu_threads"] == (int(env) if env.isdigit() else cpu_threads_per_rank(2, host_cores()))


@pytest.mark.timeout(300)
def test_fsdp_two_ranks_resumes_on_one_and_back(reference, tmp_path):
    plan, ref = reference
    # 2 ranks (FSDP2 zero3, DCP checkpoint at step 5) -> 1 rank to step 10.
    a = tmp_path / "a"
    p1 = _run(str(plan), "--out", str(a), "--stop-after-steps", "5")
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert (a / "checkpoints").is_dir()
    p2 = _run(str(plan), "--out", str(a), *ONE_RANK)
    assert p2.returncode == 0, p2.stderr[-3000:]
    got = _metrics(a)
    assert [r["step"] for r in got] == list(range(1, 11))
    _close(got, ref, range(1, 11))
    # 1 rank (single-process checkpoint) -> FSDP2 on 2 ranks to step 10.
    b = tmp_path / "b"
    p3 = _run(str(plan), "--out", str(b), "--stop-after-steps", "5", *ONE_RANK)
    assert p3.returncode == 0, p3.stderr[-3000:]
    p4 = _run(str(plan), "--out", str(b))
    assert p4.returncode == 0, p4.stderr[-3000:]
    got = _metrics(b)
    assert [r["step"] for r in got] == list(range(1, 11))
    _close(got, ref, range(1, 11))


@pytest.mark.parametrize("extra, needle", [
    (["--nproc", "3"], "--nproc 3"),
    (["--override", "layout.tp=3", "--override", "layout.dp=1", "--override",
      "cluster.num_gpus=3"], "layout.tp=3"),
    (["--override", "layout.pp=4", "--override", "layout.dp=1", "--override",
      "cluster.num_gpus=4"], "layers"),
    (["--override", "layout.pp=2", "--override", "layout.dp=1", "--override",
      "layout.sharding=none", "--override", "layout.micro_batch_size=8"], "fewer than pp=2"),
    (["--override", "layout.engine=deepspeed", "--override", "layout.tp=2", "--override",
      "layout.dp=1", "--override", "layout.sharding=none"], "data parallelism only"),
    (["--override", "cluster.num_gpus=4"], "4 GPUs"),
])
def test_misconfigured_layouts_fail_before_any_process(tmp_path, monkeypatch, capsys,
                                                       extra, needle):
    plan = _plan(tmp_path)

    def no_spawn(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    rc = cli_main(["run", str(plan), "--out", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and needle in err, err


def test_deepspeed_requested_but_missing_fails_first(tmp_path, monkeypatch, capsys):
    import executor.parallel.deepspeed_engine as dse

    plan = _plan(tmp_path)
    monkeypatch.setattr(dse, "deepspeed_available", lambda: False)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("a process was started")))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    rc = cli_main(["run", str(plan), "--out", str(tmp_path / "r"),
                   "--override", "layout.engine=deepspeed"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "DeepSpeed is not installed" in err


def test_launch_slurm_writes_a_valid_sbatch(tmp_path, capsys):
    plan = _plan(tmp_path)
    assert cli_main(["launch", str(plan), "--slurm", "--out", str(tmp_path / "job")]) == 0
    script = tmp_path / "job" / "launch_slurm.sbatch"
    text = script.read_text()
    assert "#SBATCH --nodes=" in text and "torchrun" in text and "--max-restarts" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # No controller here (tests/cluster submits to a real one): sbatch missing or refusing is
    # one line and exit 2, not a traceback.
    if "SLURM_CONF" in os.environ:
        return
    capsys.readouterr()
    assert cli_main(["launch", str(plan), "--slurm", "--submit", "--out", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--submit" in err, err
