"""Calibration learns what an MoE run adds: the load imbalance its routing produces (read
from the runs' metrics, the profile's default for layouts not run yet) and the grouped expert
GEMMs' efficiency (fitted; only MoE runs identify it), from dense and MoE runs whose step
times a known "truth" profile predicts (the MoE ones at their measured imbalance)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from costmodels.cases import single_case
from costmodels.fit import identifiable
from costmodels.presets import get_preset
from costmodels.profile import Profile
from costmodels.specs import ClusterSpec
from costmodels.steptime import evaluate
from planner.calibration.measured_runs import calibrate_runs, predict_runs
from planner.planfile import plan_from_dict, save_plan
from tests.calibration.test_calibrate import HW, fake_run
from tests.calibration.test_calibrate import LAYOUTS as DENSE_LAYOUTS

MOE = get_preset("tiny-moe")
LAYOUTS = {  # name: (layout, ranks, measured imbalance)
    "mbs4": ({"micro_batch_size": 4, "global_batch_size": 4}, 1, 1.30),
    "mbs16": ({"micro_batch_size": 16, "global_batch_size": 16}, 1, 1.20),
    "ep2": ({"dp": 2, "ep": 2, "micro_batch_size": 8, "global_batch_size": 16}, 2, 1.25),
    "ep2_mbs2": ({"dp": 2, "ep": 2, "micro_batch_size": 2, "global_batch_size": 8}, 2, 1.40),
}


def _fake_moe_run(tmp_path, name, truth: Profile):
    layout, ranks, imb = LAYOUTS[name]
    plan = plan_from_dict({
        "model": MOE.to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": ranks, "gpus_per_node": 1, "num_nodes": ranks},
        "layout": layout, "train": {"precision": "fp32", "max_steps": 8},
    })
    d = tmp_path / name
    save_plan(plan, d / "plan.yaml")
    case = single_case(plan.model_spec(), plan.layout_spec(), ClusterSpec("cpu", ranks, gpus_per_node=1),
                       truth.hardware["cpu"])
    case["moe_imbalance"] = np.full(1, imb)
    t = float(evaluate(case, truth)["step_time_s"][0])
    lines = [json.dumps({"step": s, "step_time_s": t * (3 if s == 1 else 1), "skipped": False,
                         "moe_imbalance": imb}) for s in range(1, 9)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d, t


def test_calibration_learns_imbalance_and_grouped_gemm_efficiency(tmp_path):
    truth = Profile(grouped_gemm_eff=0.45, gemm_eff={**Profile().gemm_eff, "cpu": 0.5},
                    hardware={"cpu": dict(HW)})
    base = Profile(hardware={"cpu": dict(HW)})
    runs = {n: _fake_moe_run(tmp_path, n, truth) for n in LAYOUTS}
    dense = [fake_run(tmp_path, n, truth)[0] for n in DENSE_LAYOUTS]
    fit, held = ["mbs4", "mbs16", "ep2"], ["ep2_mbs2"]
    cal = calibrate_runs(dense + [runs[n][0] for n in fit], base)
    assert cal.params["grouped_gemm_eff"] == pytest.approx(0.45, rel=0.05)
    assert cal.profile.moe_imbalance == pytest.approx(np.median([LAYOUTS[n][2] for n in fit]))
    pred = predict_runs([runs[n][0] for n in held], cal.profile)[0]
    assert pred["ape_pct"] < 3
    assert pred["ape_pct"] < predict_runs([runs[n][0] for n in held], base)[0]["ape_pct"]


def test_grouped_gemm_efficiency_is_identified_by_moe_runs_only():
    c = ClusterSpec("cpu", 1, gpus_per_node=1)
    dense = single_case(get_preset("tiny"), plan_layout(), c)
    moe = single_case(MOE, plan_layout(), c)
    assert "grouped_gemm_eff" not in identifiable(dense)
    assert "grouped_gemm_eff" in identifiable(moe)


def plan_layout():
    from costmodels.specs import Layout

    return Layout(micro_batch=8, global_batch=8, precision="fp32")
