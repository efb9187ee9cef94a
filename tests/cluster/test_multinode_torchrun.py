"""Two "nodes" on one host: the plan's own `launch_torchrun.sh` started twice, each a torchrun
agent with one rank, meeting through c10d rendezvous on loopback (the path a multi-node job
takes), trains a dp2 plan to the same losses as one agent with two ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.timeout(300)
def test_two_agents_on_loopback_match_one_agent(tmp_path):
    out = tmp_path / "plan"
    subprocess.run([sys.executable, "-m", "planner.cli", "plan", "--model", "tiny", "--gpu", "cpu",
                    "--gpus", "2", "--gpus-per-node", "1", "--seq-len", "64", "--global-batch-tokens",
                    "1024", "--sharding", "none", "--recompute", "none", "--out", str(out),
                    "--override", "train.max_steps=6", "--override", "checkpoint.every=0",
                    "--override", "data.max_docs_per_domain=300"],
                   check=True, env=_env(), capture_output=True, timeout=120)
    plan = out / "plan.yaml"
    lay = __import__("yaml").safe_load(plan.read_text())["layout"]
    assert lay["dp"] == 2 and lay["tp"] == lay["pp"] == lay["cp"] == 1
    script = (out / "launch_torchrun.sh").read_text()
    assert "--nnodes 2" in script and "--rdzv-backend c10d" in script
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RDZV_ID="loopback",
               PLAN=str(plan), RUN_DIR=str(tmp_path / "two"))
    agents = [subprocess.Popen(["bash", str(out / "launch_torchrun.sh")], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    logs = [a.communicate(timeout=240)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), logs[0][-2000:] + logs[1][-2000:]
    one = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(plan), "--out",
                          str(tmp_path / "one")], env=_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    two, single = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(single) == 6
    for a, b in zip(two, single, strict=True):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (a, b)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary.get("world_size", 2) == 2


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.mark.timeout(400)
def test_a_rank_killed_on_one_node_restarts_the_group_and_resumes(tmp_path):
    """SIGKILL of the rank on "node" 1 mid-run: torchrun (--max-restarts 3 for multi-node
    plans) restarts both agents' workers, which resume from the newest checkpoint; every step
    is logged once."""
    import time

    out = tmp_path / "plan"
    subprocess.run([sys.executable, "-m", "planner.cli", "plan", "--model", "tiny", "--gpu", "cpu",
                    "--gpus", "2", "--gpus-per-node", "1", "--seq-len", "64", "--global-batch-tokens",
                    "1024", "--sharding", "none", "--recompute", "none", "--out", str(out),
                    "--override", "train.max_steps=14", "--override", "checkpoint.every=3",
                    "--override", "data.max_docs_per_domain=300"],
                   check=True, env=_env(), capture_output=True, timeout=120)
    run = tmp_path / "run"
    # the survivor's collective waits on the dead peer until the process-group timeout
    # (executor.parallel.mesh; 120 s on CPUs) before torchrun can restart it: shorten it here
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RDZV_ID="kill",
               PLAN=str(out / "plan.yaml"), RUN_DIR=str(run), MESHPLAN_DIST_TIMEOUT_S="15")
    agents = [subprocess.Popen(["bash", str(out / "launch_torchrun.sh")], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    deadline = time.time() + 200
    killed = None
    while time.time() < deadline and killed is None:
        steps = _losses(run) if (run / "metrics.jsonl").is_file() else []
        # mid-step 5, away from step 6's checkpoint: a kill inside a save is
        # tests/reliability/test_faults_layouts.py's
        if len(steps) >= 4:
            workers = _children(agents[1].pid)
            assert workers, "agent 1 has no worker process"
            killed = workers[0]
            os.kill(killed, 9)
        time.sleep(0.05)
    assert killed is not None, "training never logged step 4"
    logs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), logs[0][-2000:] + logs[1][-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == list(range(1, 15))
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    resumes = [e["step"] for e in events if e.get("event") == "resume"]
    assert resumes and resumes[0] >= 3 and resumes[0] % 3 == 0
