"""The contract of `meshplan calibrate --local-loop --json`: the whole loop on this machine
(bench, short runs of several layouts, fit, held-out prediction), one JSON object on stdout."""

import json

import pytest

from executor.calibration_loop import LOOP_RUNS, LOOP_STEPS
from planner.calibration.measured_runs import load_run
from planner.profiles import load_profile
from tests.conftest import run_cli
from tests.scale import FULL, scaled

# The three held-out runs and four fitted ones (one process at two micro-batches, DDP, TP),
# 5 steps a run (3 warm-up, median of 2). The whole loop (LOOP_RUNS at LOOP_STEPS, with its
# checks) runs in `make demo` and at full scale (`tests.scale`).
QUICK = ("single_mbs2", "single_mbs8", "ddp2", "tp2", "fsdp2_zero3", "pp2", "tp2_sp")
SUBSET = list(LOOP_RUNS) if FULL else [r for r in LOOP_RUNS if r.name in QUICK]
STEPS = scaled(5, LOOP_STEPS)


@pytest.mark.timeout(900)
def test_local_loop_contract(tmp_path):
    proc = run_cli("calibrate", "--local-loop", "--json", "--workdir", str(tmp_path / "loop"),
                   "--steps", str(STEPS), "--loop-runs", ",".join(r.name for r in SUBSET), timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    held = res["heldout"]
    assert len(held) == sum(r.held_out for r in SUBSET) and not res["failed_runs"]
    assert len(res["checks"]) == sum(r.check for r in SUBSET)
    unseen = [h["ape_pct"] for h in held + res["checks"]]
    assert res["unseen_max_ape_pct"] == pytest.approx(max(unseen))
    for h in held:
        assert {"layout", "predicted_step_time_s", "measured_step_time_s", "ape_pct"} <= set(h)
        assert h["measured_step_time_s"] > 0 and h["predicted_step_time_s"] > 0
        assert h["ape_pct"] == pytest.approx(abs(h["predicted_step_time_s"] / h["measured_step_time_s"] - 1) * 100)
    assert {h["layout"].split()[0] for h in held} == {"dp2+zero3", "pp2", "tp2+sp"}
    # Calibrating on this machine predicts the layouts it never ran better than the default.
    assert res["median_ape_pct"] < res["default_profile_median_ape_pct"]
    assert len(res["fitted_on"]) == sum(not (r.held_out or r.check) for r in SUBSET)
    prof = load_profile(res["profile_path"])
    assert prof.hardware["cpu"]["host_cores"] >= 1 and prof.hardware["cpu"]["fp32_tflops"] > 0
    # Every run, multi-rank ones included, logged the host's speed while it ran, and the
    # fitted profile holds the probe figure its rates were measured beside.
    assert prof.hardware["cpu"]["probe_fp32_tflops"] > 0
    for r in SUBSET:
        run = load_run(tmp_path / "loop" / "runs" / r.name)
        assert run.host_fp32_tflops and run.host_fp32_tflops > 0
