"""Calibration: alpha-beta fits, profile hardware overrides, fitting measured runs."""

import json

import numpy as np
import pytest

from costmodels.cases import single_case
from costmodels.errors import MeshplanError
from costmodels.presets import get_preset
from costmodels.profile import Profile, dump_profile
from costmodels.specs import ClusterSpec, Layout
from costmodels.steptime import evaluate
from executor.bench import fit_alpha_beta, layer_gemm_shapes
from planner.calibration.measured_runs import calibrate_runs, chart, load_run, predict_runs
from planner.planfile import plan_from_dict, save_plan
from planner.profiles import load_profile
from tests.conftest import assert_clean_error, cli_in_process, run_cli

HW = {"fp32_tflops": 0.05, "bf16_tflops": 0.1, "hbm_tb_s": 0.01, "scaleout_gbps": 1.0,
      "scaleup_gbps": 1.0, "link_latency_s": 5e-4}


def test_alpha_beta_fit_recovers_known_link():
    alpha, beta = 2e-4, 1.5e9  # 200 us, 1.5 GB/s
    pts = [(b, alpha + 2 * (1 / 2) * b / beta) for b in (4e3, 6.4e4, 1e6, 4e6, 1.6e7)]
    fit = fit_alpha_beta(pts, bus_factor=1.0)
    assert fit["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert fit["bus_gbps"] == pytest.approx(1.5, rel=1e-6)


def test_layer_gemm_shapes():
    assert layer_gemm_shapes(256, 688, 2048, 128) == [(2048, 512, 256), (2048, 256, 256), (2048, 688, 256), (2048, 256, 688)]


def test_hardware_override_changes_prediction():
    m, c = get_preset("tiny"), ClusterSpec("cpu", 1, gpus_per_node=1)
    lay = Layout(micro_batch=8, global_batch=8, precision="fp32")
    base = evaluate(single_case(m, lay, c), Profile())["step_time_s"][0]
    slower = evaluate(single_case(m, lay, c, {"fp32_tflops": 0.018}), Profile())["step_time_s"][0]
    assert slower > 5 * base  # a 10x slower measured peak makes compute ~10x slower


def test_profile_hardware_round_trip(tmp_path):
    p = Profile(hardware={"cpu": dict(HW)})
    f = tmp_path / "p.yaml"
    f.write_text(dump_profile(p))
    assert load_profile(f).hardware["cpu"] == HW
    f.write_text("hardware: {cpu: {fp32_tflops: fast}}\n")
    with pytest.raises(MeshplanError, match="not a number"):
        load_profile(f)
    f.write_text("hardware: {cpu: {warp_drive: 1}}\n")
    with pytest.raises(MeshplanError, match="unknown key"):
        load_profile(f)


LAYOUTS = {
    "single8": ({"micro_batch_size": 8, "global_batch_size": 8}, 1),
    "single16": ({"micro_batch_size": 16, "global_batch_size": 16}, 1),
    "ddp2": ({"dp": 2, "micro_batch_size": 8, "global_batch_size": 16}, 2),
    "tp2": ({"tp": 2, "micro_batch_size": 16, "global_batch_size": 16}, 2),
    "zero3": ({"dp": 2, "sharding": "zero3", "micro_batch_size": 8, "global_batch_size": 16}, 2),
    "pp2": ({"pp": 2, "micro_batch_size": 4, "global_batch_size": 16}, 2),
}


def fake_run(tmp_path, name, truth: Profile, noise=0.0, seed=0):
    """A run directory whose step times are what `truth` predicts (plus noise)."""
    layout, gpus = LAYOUTS[name]
    plan = plan_from_dict({
        "model": get_preset("tiny").to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": gpus, "gpus_per_node": 1, "num_nodes": gpus},
        "layout": layout, "train": {"precision": "fp32", "max_steps": 8},
    })
    d = tmp_path / name
    save_plan(plan, d / "plan.yaml")
    c = ClusterSpec("cpu", gpus, gpus_per_node=1)
    t = float(evaluate(single_case(plan.model_spec(), plan.layout_spec(), c, truth.hardware["cpu"]), truth)["step_time_s"][0])
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"step": s, "step_time_s": t * (3 if s == 1 else 1 + noise * rng.standard_normal()),
                         "skipped": False}) for s in range(1, 9)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d, t


def test_calibration_recovers_a_known_machine(tmp_path):
    truth = Profile(gemm_eff={**Profile().gemm_eff, "cpu": 0.35}, layer_overhead_s=3e-3, link_eff=0.6,
                    hardware={"cpu": dict(HW)})
    base = Profile(hardware={"cpu": dict(HW)})
    dirs, times = zip(*(fake_run(tmp_path, n, truth, noise=0.01, seed=i) for i, n in enumerate(LAYOUTS)), strict=True)
    fit_dirs, held = dirs[:4], dirs[4:]
    cal = calibrate_runs(list(fit_dirs), base)
    assert cal.median_ape("after_ape_pct") < 3
    assert cal.median_ape("after_ape_pct") < cal.median_ape("before_ape_pct")
    assert all(r["loro_ape_pct"] is not None for r in cal.rows)
    held_pred = predict_runs(list(held), cal.profile)
    before = predict_runs(list(held), base)
    assert np.median([h["ape_pct"] for h in held_pred]) < np.median([b["ape_pct"] for b in before])
    assert np.median([h["ape_pct"] for h in held_pred]) < 15
    png = chart([(r["layout"], r["measured_step_time_s"], r["after_step_time_s"]) for r in cal.rows],
                tmp_path / "c.png", "t")
    assert png.stat().st_size > 1000


def test_unusable_runs_are_reported_and_skipped(tmp_path):
    truth = Profile(hardware={"cpu": dict(HW)})
    good = [fake_run(tmp_path, n, truth)[0] for n in ("single8", "single16", "ddp2")]
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    save_plan(plan_from_dict({"model": get_preset("tiny").to_dict()}), corrupt / "plan.yaml")
    (corrupt / "metrics.jsonl").write_text('{"step": 1, "step_time_s": 1.0}\n{not json\n')
    short = tmp_path / "short"
    save_plan(plan_from_dict({"model": get_preset("tiny").to_dict()}), short / "plan.yaml")
    (short / "metrics.jsonl").write_text('{"step": 1, "step_time_s": 1.0}\n')
    cal = calibrate_runs([*good, empty, corrupt, short], truth)
    assert len(cal.rows) == 3
    assert set(cal.unusable) == {str(empty), str(corrupt), str(short)}
    assert "not JSON" in cal.unusable[str(corrupt)]
    with pytest.raises(MeshplanError, match="no metrics.jsonl|not found"):
        load_run(empty)


def test_calibrate_cli(tmp_path):
    truth = Profile(hardware={"cpu": dict(HW)})
    dirs = [str(fake_run(tmp_path, n, truth)[0]) for n in ("single8", "single16", "ddp2")]
    prof_in = tmp_path / "in.yaml"
    prof_in.write_text(dump_profile(truth))
    out = tmp_path / "fitted.yaml"
    proc = cli_in_process("calibrate", *dirs, str(tmp_path / "nope"), "--profile", str(prof_in), "--out", str(out),
                   "--chart", str(tmp_path / "c.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert len(res["runs"]) == 3 and str(tmp_path / "nope") in res["unusable"]
    assert load_profile(out).hardware["cpu"] == HW
    assert_clean_error(cli_in_process("calibrate"), "--local-loop")
    assert_clean_error(cli_in_process("calibrate", str(tmp_path / "nope")), "no usable run")


def test_bench_records_this_machine_and_plans_use_it(tmp_path, monkeypatch):
    machine = tmp_path / "machine.yaml"
    monkeypatch.setenv("MESHPLAN_MACHINE_PROFILE", str(machine))
    predict = ("predict", "--model", "tiny", "--gpu", "cpu", "--gpus", "1", "--micro-batch", "8",
               "--global-batch", "8", "--precision", "fp32", "--json")
    shipped = json.loads(run_cli(*predict).stdout)
    proc = run_cli("bench", "--quick", "--world", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["machine_profile"] == str(machine)
    hw = load_profile().hardware["cpu"]  # merged into the default profile from now on
    assert hw["fp32_tflops"] > 0 and hw["host_cores"] >= 1
    assert load_profile(machine=False).hardware == {}  # the shipped profile is untouched
    measured = json.loads(run_cli(*predict).stdout)
    assert measured["step_time_s"] != shipped["step_time_s"]
    machine.write_text("hardware: [not, a, mapping]\n")
    assert_clean_error(run_cli(*predict), "machine.yaml", "meshplan bench")
    proc = run_cli("bench", "--quick", "--world", "1", "--json")  # bench repairs it
    assert proc.returncode == 0 and load_profile().hardware["cpu"]["fp32_tflops"] > 0
