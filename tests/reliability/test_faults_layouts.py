"""Faults in the composed layouts: a rank SIGKILLed during a distributed-checkpoint save under
TP x PP x DP on 8 ranks, as it enters a step under HSDP and under expert parallelism (both
kills on each at full scale, `tests.scale`); torchrun restarts the group, the run resumes from the newest intact checkpoint, every sample id is
consumed exactly once and the final loss equals the unfaulted run's. A NaN in one pipeline
stage's or one replica's gradients: every rank skips that step (decided on all-reduced values)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from costmodels.presets import PRESETS
from tests.reliability.helpers import (
    FAULT_RESULTS,
    ROOT,
    read_events,
    read_metrics,
    sample_accounting,
)
from tests.reliability.test_faults import plan_data, run_inproc, write_plan
from tests.scale import FULL

STEPS = 8
ROWS = 8
PARITY = 1e-4  # relative: the layouts match the one-process run to this (tests/parallel)
# tiny-moe shrunk as in tests/executor/test_moe_run.py: 8 experts, top-2, 2 layers of width 64
MOE = PRESETS["tiny-moe"].with_(layers=2, hidden=64, heads=4, kv_heads=2, expert_ffn_hidden=64,
                                seq_len=64).to_dict()


def layout_plan(layout: dict[str, Any], world: int, model: dict[str, Any] | None = None) -> dict[str, Any]:
    data = plan_data(cluster={"num_gpus": world},
                     layout={"micro_batch_size": 2, "global_batch_size": ROWS, **layout},
                     train={"max_steps": STEPS}, checkpoint={"every": 2, "keep": 3})
    if model is not None:
        data["model"] = model
    return data


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The unfaulted run of a model in one process (the same global batch and seed), once per
    model: `reference(model)` -> its metrics rows."""
    runs: dict[str, list[dict[str, Any]]] = {}

    def rows(model: dict[str, Any] | None) -> list[dict[str, Any]]:
        key = "dense" if model is None else model["name"]
        if key not in runs:
            tmp = tmp_path_factory.mktemp(f"ref_{key}")
            plan = write_plan(tmp, layout_plan({}, 1, model))
            rc, _, err = run_inproc(plan, tmp / "run")
            assert rc == 0, err
            runs[key] = read_metrics(tmp / "run")
        return runs[key]

    return rows


def _torchrun(plan: Path, run: Path, world: int, kills: list[str], restarts: int) -> str:
    """`meshplan run` under an external torchrun (as on a cluster), planted kills armed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "MESHPLAN_DIST_TIMEOUT_S": "60"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc-per-node", str(world), "--max-restarts", str(restarts),
         "-m", "tests.reliability.rank_faults", *kills, "--",
         "run", str(plan), "--out", str(run), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


# name -> (layout, ranks, kills, the steps the run resumed from, model: None for the dense
# micro model). A kill is
# `WHERE:ATTEMPT:RANK:STEP` (tests.reliability.rank_faults); checkpoints every 2 steps.
CASES = {
    # rank 3 dies inside step 6's DCP save, after writing its shards: the half-written save
    # is never resumed from (step 4 is).
    "tp2 pp2 dp2": ({"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True}, 8,
                    ["save:0:3:6"], [4], None),
    # HSDP: rank 2 dies as it enters step 5 (its peers inside that step's collectives).
    "dp4 dp_shard=2 zero3": ({"dp": 4, "dp_shard": 2, "sharding": "zero3",
                              "micro_batch_size": 1}, 4, ["step:0:2:5"], [4], None),
    # EP: rank 1 (the other half of the experts) dies as it enters step 5, its peer inside
    # that step's all-to-all.
    "dp2 ep2 (MoE)": ({"dp": 2, "ep": 2}, 2, ["step:0:1:5"], [4], MOE),
}
if FULL:  # `tests.scale`: each layout also sees the other kill, on the restarted group
    FULL_KILLS = {"tp2 pp2 dp2": ["step:0:5:5", "save:1:3:6"],
                  "dp4 dp_shard=2 zero3": ["step:0:2:5", "save:1:1:6"],
                  "dp2 ep2 (MoE)": ["step:0:1:5", "save:1:0:6"]}
    for name, kills in FULL_KILLS.items():
        lay, world, _, _, model = CASES[name]
        CASES[name] = (lay, world, kills, [4, 4], model)


@pytest.mark.ranks8
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(CASES))
def test_rank_killed_mid_step_or_in_a_dcp_save_resumes_exactly(tmp_path, reference, name) -> None:
    layout, world, kills, resumed_at, model = CASES[name]
    plan = write_plan(tmp_path, layout_plan(layout, world, model))
    run = tmp_path / "run"
    _torchrun(plan, run, world, kills, restarts=len(kills))
    resumes = [e["step"] for e in read_events(run) if e["event"] == "resume"]
    assert resumes == resumed_at, resumes
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    lost, duplicated = sample_accounting(recs, ROWS)
    assert (lost, duplicated) == (0, 0)
    ref = reference(model)
    diff = abs(recs[-1]["loss"] - ref[-1]["loss"]) / abs(ref[-1]["loss"])
    assert diff <= PARITY, (recs[-1]["loss"], ref[-1]["loss"])
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    FAULT_RESULTS.append({"fault": f"SIGKILL {', '.join(kills)} ({name}, {world} ranks)",
                          "times": len(kills), "outcome": "recovered (torchrun restart)",
                          "lost": lost, "duplicated": duplicated, "loss_diff": diff})


# (layout, the rank whose gradients turn NaN): the first pipeline stage (nothing carries its
# gradients to the last), and a data-parallel rank whose gradient copy is not the one the
# whole-tensor norm reads (its non-finite flag must still reach every rank).
NAN_CASES = {"pp2 stage 0": ({"pp": 2}, 0), "dp2 rank 1": ({"dp": 2}, 1)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(NAN_CASES))
def test_nan_in_one_rank_or_stage_skips_on_every_rank(tmp_path, corpus, name) -> None:
    from tests.parallel.distutil import run_distributed
    from tests.reliability.dist_workers import train_with_fault

    layout, bad = NAN_CASES[name]
    nan_step = 3
    data = layout_plan(layout, 2)
    results = run_distributed(train_with_fault, 2, data, str(tmp_path / "run"),
                              [f"nangrad@{nan_step}:{bad}"], timeout=240)
    by_rank = {r["rank"]: r for r in results}
    planted = {rank: [s["step"] for s in by_rank[rank]["steps"] if s["faults"]] for rank in (0, 1)}
    assert planted == {bad: [nan_step], 1 - bad: []}, planted
    # Only one rank's gradients went bad, yet every rank skipped that update, and only that one.
    for rank in (0, 1):
        skipped = [(s["step"], s["reason"]) for s in by_rank[rank]["steps"] if s["skipped"]]
        assert skipped == [(nan_step, "nonfinite")], (rank, skipped)
        assert all(v == v for v in by_rank[rank]["checksum"].values())  # no NaN weights
    if "dp" in layout:  # the replicas still hold the same weights
        assert by_rank[0]["checksum"] == by_rank[1]["checksum"]
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs if r["skipped"]] == [nan_step]
    assert all(r["loss"] == r["loss"] for r in recs)
    FAULT_RESULTS.append({"fault": f"NaN in {name}'s gradients (step {nan_step})",
                          "times": 1, "outcome": "recovered (step skipped on both ranks)",
                          "lost": 0, "duplicated": 0, "loss_diff": float("nan")})
