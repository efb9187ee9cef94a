"""The host-speed probe: the bench records it beside its rates, a run with `train.host_probe`
logs it each step, and calibration prices that run at the speed it saw."""

import json

import pytest
import torch

from costmodels.cases import single_case
from costmodels.hardware import at_host_speed, is_host_rate
from costmodels.presets import get_preset
from costmodels.profile import HARDWARE_KEYS, Profile
from costmodels.specs import ClusterSpec, Layout
from costmodels.steptime import evaluate
from executor.bench import BenchResult
from executor.host_probe import HostProbe
from planner.calibration.measured_runs import load_run, predict_runs
from planner.planfile import PlanError, plan_from_dict, save_plan

HW = {"fp32_tflops": 0.2, "fp32_tflops_1core": 0.1, "hbm_tb_s": 0.05, "host_cores": 2.0,
      "elementwise_tb_s": 0.008, "elementwise_tb_s_1core": 0.004, "scaleup_gbps": 1.0,
      "scaleout_gbps": 1.0, "link_latency_s": 1e-4,
      "probe_fp32_tflops": 0.1}


def test_at_host_speed_scales_compute_and_memory_by_the_probe():
    slow = at_host_speed(HW, 0.05)  # the probe at half the rate it read beside the bench
    assert slow["fp32_tflops"] == pytest.approx(0.1) and slow["fp32_tflops_1core"] == pytest.approx(0.05)
    assert slow["hbm_tb_s"] == pytest.approx(0.025) and slow["elementwise_tb_s_1core"] == pytest.approx(0.002)
    assert slow["link_latency_s"] == HW["link_latency_s"] and slow["host_cores"] == 2.0
    assert slow["probe_fp32_tflops"] == HW["probe_fp32_tflops"]
    assert at_host_speed(HW, None) == HW  # a run without a probe
    no_ref = {k: v for k, v in HW.items() if k != "probe_fp32_tflops"}
    assert at_host_speed(no_ref, 0.05) == no_ref  # a profile measured without one


def test_every_hardware_key_is_classed_as_a_rate_or_not():
    rates = {k for k in HARDWARE_KEYS if is_host_rate(k)}
    assert rates == {"bf16_tflops", "fp32_tflops", "fp8_tflops", "fp4_tflops", "hbm_tb_s", "fp32_tflops_1core",
                     "bf16_tflops_1core", "elementwise_tb_s", "elementwise_tb_s_1core"}


def test_probe_measures_on_every_core_and_restores_the_threads(monkeypatch):
    import executor.host_probe as host_probe

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(host_probe, "host_cores", lambda: 3)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    try:
        assert HostProbe().measure() > 0
        assert calls == [3, 1]  # all the host's cores for the GEMM, then the caller's count back
    finally:
        monkeypatch.undo()
        torch.set_num_threads(before)
    assert BenchResult(device="cpu", threads=2, probe_fp32_tflops=0.12).hardware_override()["probe_fp32_tflops"] == 0.12
    assert "probe_fp32_tflops" not in BenchResult(device="cpu", threads=2).hardware_override()


def _run_dir(tmp_path, name, probes: list[float]):
    plan = plan_from_dict({
        "model": get_preset("tiny").to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": 1, "gpus_per_node": 1, "num_nodes": 1},
        "layout": {"micro_batch_size": 8, "global_batch_size": 8},
        "train": {"precision": "fp32", "max_steps": 8, "host_probe": True},
    })
    d = tmp_path / name
    save_plan(plan, d / "plan.yaml")
    recs = [{"step": s, "step_time_s": 1.0, "skipped": False, "host_fp32_tflops": g}
            for s, g in enumerate(probes, 1)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return d


def test_a_run_is_priced_at_the_host_speed_its_probes_saw(tmp_path):
    # warm-up steps' probes are dropped with their step times; the median of the rest is kept
    fast = _run_dir(tmp_path, "fast", [9.0] * 3 + [0.1, 0.11, 0.09])
    slow = _run_dir(tmp_path, "slow", [0.1] * 3 + [0.05] * 3)
    assert load_run(fast).host_fp32_tflops == pytest.approx(0.1)
    prof = Profile(hardware={"cpu": dict(HW)})
    t_fast, t_slow = (p["predicted_step_time_s"] for p in predict_runs([fast, slow], prof))
    lay = Layout(micro_batch=8, global_batch=8, precision="fp32")
    bench_speed = evaluate(single_case(get_preset("tiny"), lay, ClusterSpec("cpu", 1, gpus_per_node=1), HW), prof)
    assert t_fast == pytest.approx(float(bench_speed["step_time_s"][0]))  # probe == reference
    # a host at half speed for compute and memory: every rate-bound term takes twice as long
    assert 1.6 * t_fast < t_slow <= 2.0 * t_fast + 1e-12


def test_host_probe_is_refused_off_the_cpu():
    with pytest.raises(PlanError, match="train.host_probe"):
        plan_from_dict({"model": get_preset("tiny").to_dict(), "cluster": {"accelerator": "h100", "num_gpus": 1},
                        "train": {"host_probe": True}})
