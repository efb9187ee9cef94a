"""How the cost model describes a CPU host from what `meshplan bench` measured: thread
splits, exposed gloo collectives, per-collective links, the pipeline bubble without the
output head, and the bench's conversion of fitted alphas into per-step latencies."""

import numpy as np
import pytest

from costmodels.cases import single_case
from costmodels.hardware import cpu_threads_per_rank
from costmodels.presets import get_preset
from costmodels.profile import Profile
from costmodels.specs import ClusterSpec, Layout
from costmodels.steptime import evaluate
from executor.bench import BenchResult

HW = {"fp32_tflops": 0.2, "fp32_tflops_1core": 0.1, "hbm_tb_s": 0.05, "host_cores": 4.0,
      "elementwise_tb_s": 0.008, "elementwise_tb_s_1core": 0.004,
      "scaleup_gbps": 1.0, "scaleout_gbps": 1.0, "link_latency_s": 1e-4}


def _case(ranks: int, hw: dict, **layout):
    lay = Layout(precision="fp32", micro_batch=8, global_batch=8 * layout.get("dp", 1), **layout)
    return single_case(get_preset("tiny"), lay, ClusterSpec("cpu", ranks, gpus_per_node=1), hw)


def test_threads_per_rank_splits_the_host():
    assert cpu_threads_per_rank(1, 4) == 4
    assert cpu_threads_per_rank(2, 4) == 2
    assert cpu_threads_per_rank(3, 4) == 1
    assert cpu_threads_per_rank(8, 4) == 1


@pytest.mark.parametrize(("ranks", "tflops", "elem_tb_s"), [
    (1, 0.2, 0.008),      # every core: the all-cores figures
    (2, 0.1, 0.004),      # 2 threads of 4 would interpolate to 0.133, but two ranks share 0.2
    (4, 0.05, 0.002),     # one thread each (one-thread figure 0.1), four sharing the host
])
def test_ranks_share_the_all_core_rate(ranks, tflops, elem_tb_s):
    dp = {"dp": ranks} if ranks > 1 else {}
    c = _case(ranks, HW, **dp)
    assert c["peak_gemm"][0] == pytest.approx(tflops * 1e12)
    assert c["elem_bw"][0] == pytest.approx(elem_tb_s * 1e12)


def test_a_run_that_pinned_its_threads_is_predicted_at_that_count():
    one = _case(1, {**HW, "threads_per_rank": 1.0})
    assert one["peak_gemm"][0] == pytest.approx(0.1e12)
    two = _case(1, {**HW, "threads_per_rank": 2.0})  # interpolated: a third of the way up
    assert two["peak_gemm"][0] == pytest.approx((0.1 + 0.1 / 3) * 1e12)
    over = _case(1, {**HW, "threads_per_rank": 8.0})  # 8 threads on 4 cores time-share
    assert over["peak_gemm"][0] == pytest.approx(0.2e12 * 4 / 8)


def test_gloo_collectives_on_a_cpu_are_never_hidden():
    prof = Profile(dp_overlap=1.0)
    ddp = evaluate(_case(2, HW, dp=2), prof)
    assert ddp["dp_comm_s"][0] > 0 and ddp["dp_exposed_s"][0] == pytest.approx(ddp["dp_comm_s"][0])
    gpu = single_case(get_preset("small"), Layout(dp=8, micro_batch=4, global_batch=32),
                      ClusterSpec("h100-sxm", 8))
    g = evaluate(gpu, prof)
    assert g["dp_exposed_s"][0] < g["dp_comm_s"][0]  # an accelerator overlaps them


def test_sequence_parallel_uses_the_measured_allgather_and_reduce_scatter():
    prof = Profile()
    slow_rs = {**HW, "reduce_scatter_bw_rel": 0.25}
    sp = [evaluate(_case(2, hw, tp=2, sequence_parallel=True), prof)["tp_comm_s"][0] for hw in (HW, slow_rs)]
    plain = [evaluate(_case(2, hw, tp=2), prof)["tp_comm_s"][0] for hw in (HW, slow_rs)]
    assert sp[1] > 1.5 * sp[0]  # SP pays the reduce-scatter's own (slower) link
    assert plain[1] == pytest.approx(plain[0])  # all-reduces do not use it


def test_pipeline_bubble_is_spent_on_stages_without_the_output_head():
    prof = Profile()
    lay = Layout(pp=2, micro_batch=2, global_batch=8, precision="fp32")
    cl = ClusterSpec("cpu", 2, gpus_per_node=1)
    small_v = evaluate(single_case(get_preset("tiny"), lay, cl, HW), prof)
    big_v = evaluate(single_case(get_preset("tiny").with_(vocab=65536), lay, cl, HW), prof)
    assert big_v["compute_s"][0] > 2 * small_v["compute_s"][0]  # the last stage's logits grow
    assert big_v["pp_bubble_s"][0] == pytest.approx(small_v["pp_bubble_s"][0])  # fill/drain do not


def test_bench_turns_fitted_alphas_into_the_models_per_step_latencies():
    res = BenchResult(device="cpu", threads=2, memory_gb_s=50.0, elementwise_gb_s=8.0,
                      elementwise_gb_s_1core=4.5)
    res.collectives = {
        "all_reduce": {"alpha_s": 4e-4, "bus_gbps": 2.0, "world": 4},
        "all_gather": {"alpha_s": 3e-4, "bus_gbps": 1.0, "world": 4},
        "reduce_scatter": {"alpha_s": 6e-4, "bus_gbps": 0.5, "world": 4},
        "send_recv": {"alpha_s": 1e-4, "bus_gbps": 4.0, "world": 4},
        "tp_all_gather": {"alpha_s": 9e-4, "bus_gbps": 0.5, "world": 4},
    }
    hw = res.hardware_override()
    assert hw["link_latency_s"] == pytest.approx(4e-4 / 6)  # ring all-reduce: 2(n-1) steps
    assert hw["allgather_latency_s"] == pytest.approx(1e-4)  # n-1 steps
    assert hw["reduce_scatter_bw_rel"] == pytest.approx(0.25)
    assert hw["p2p_bw_rel"] == pytest.approx(2.0) and hw["p2p_latency_s"] == pytest.approx(1e-4)
    assert hw["elementwise_tb_s"] == pytest.approx(0.008) and hw["elementwise_tb_s_1core"] == pytest.approx(0.0045)
    assert np.isclose(hw["hbm_tb_s"], 0.05)
    # DTensor-issued (TP) collectives carry their own dispatch cost.
    assert hw["tp_allgather_latency_s"] == pytest.approx(3e-4) and hw["tp_allgather_bw_rel"] == pytest.approx(0.25)
    assert "tp_reduce_scatter_latency_s" not in hw  # not measured: falls back to the plain one


def test_tp_collectives_fall_back_to_the_plain_collectives_figures():
    c = _case(2, {**HW, "allgather_latency_s": 2e-3, "tp_reduce_scatter_latency_s": 5e-3}, tp=2)
    assert c["tp_allgather_lat"][0] == 2e-3 and c["tp_reduce_scatter_lat"][0] == 5e-3
    assert c["tp_allreduce_lat"][0] == -1.0  # the link's own latency


def test_sync_call_cost_is_charged_per_collective_on_cpu_only():
    base, slow = Profile(sync_jitter=0.0), Profile(sync_jitter=0.0, cpu_sync_call_s=0.01)
    layers = get_preset("tiny").layers
    tp = [evaluate(_case(2, HW, tp=2), p)["step_time_s"][0] for p in (base, slow)]
    assert tp[1] - tp[0] == pytest.approx(0.01 * 4 * layers)  # 4 all-reduces per layer, 1 micro-batch
    sp = [evaluate(_case(2, HW, tp=2, sequence_parallel=True), p)["step_time_s"][0] for p in (base, slow)]
    assert sp[1] - sp[0] == pytest.approx(0.01 * 4 * layers)  # each all-gather + reduce-scatter pair meets once
    pp = [evaluate(_case(2, HW, pp=2), p)["step_time_s"][0] for p in (base, slow)]
    assert pp[1] == pytest.approx(pp[0])  # the schedule prices a stage's wait for its neighbour
    dp = [evaluate(_case(2, HW, dp=2), p)["step_time_s"][0] for p in (base, slow)]
    assert dp[1] - dp[0] == pytest.approx(0.01)  # one bucket of gradients
    one = [evaluate(_case(1, HW), p)["step_time_s"][0] for p in (base, slow)]
    assert one[1] == pytest.approx(one[0])  # a single process meets nobody
    gpu = single_case(get_preset("small"), Layout(tp=8, micro_batch=1, global_batch=8), ClusterSpec("h100-sxm", 8))
    assert evaluate(gpu, slow)["step_time_s"][0] == pytest.approx(evaluate(gpu, base)["step_time_s"][0])


def test_container_cpu_quota_caps_the_host_cores(tmp_path):
    from executor.host import cgroup_cpu_limit

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_limit(str(v2)) == 2.0
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(v2)) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1")) == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1")) is None
    assert cgroup_cpu_limit(str(tmp_path / "nowhere")) is None


def test_adam_streams_its_states_in_place_at_each_ranks_share_of_the_host():
    params = get_preset("tiny").param_count()
    one = evaluate(_case(1, HW), Profile())["optimizer_s"][0]
    assert one == pytest.approx(36 * params / (HW["hbm_tb_s"] * 1e12), rel=1e-3)  # in place, not out-of-place
    two = evaluate(_case(2, HW, dp=2), Profile())["optimizer_s"][0]
    assert two == pytest.approx(2 * one)  # two ranks at once share the host's bandwidth
    small = {**HW, "host_cores": 2.0}
    four = evaluate(_case(4, small, dp=4), Profile())["optimizer_s"][0]
    assert four == pytest.approx(4 * one)  # four ranks on two cores together never exceed it
    gpu = single_case(get_preset("small"), Layout(micro_batch=1, global_batch=8, dp=8), ClusterSpec("h100-sxm", 8))
    prof = Profile()
    gpu_opt = evaluate(gpu, prof)["optimizer_s"][0]
    from costmodels.hardware import get_accelerator
    bw = get_accelerator("h100-sxm").hbm_tb_s * 1e12 * prof.elementwise_eff
    assert gpu_opt == pytest.approx(36 * get_preset("small").param_count() / bw, rel=1e-3)  # the elementwise share of HBM
