"""The planner across pipeline schedules: the search tries every schedule the target stack
runs, `plan --json` reports the winner under each and why it wins, `predict --json` memory
on the first and the last pipeline rank per schedule, and Megatron plans keep to 1F1B."""

from __future__ import annotations

import json

import pytest

from costmodels.pipeline import SCHEDULE_NAMES
from costmodels.presets import PRESETS
from costmodels.specs import ClusterSpec, Layout
from planner import emitters
from planner.planfile import Plan
from planner.profiles import load_profile
from planner.schedule_choice import compare_schedules
from planner.search import SearchSpace, search
from tests.conftest import cli_in_process


def test_plan_json_lists_schedules_and_the_winner_under_each():
    proc = cli_in_process("plan", "--model", "llama3-405b", "--gpu", "h100-sxm", "--gpus", "16384",
                   "--seq-len", "8192", "--global-batch-tokens", "16M", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["schedules_evaluated"] == list(SCHEDULE_NAMES)
    assert all(r["schedule_candidates"][n] > 0 for n in ("zbh1", "interleaved_zb", "zbv"))
    for name, why in r["schedules_not_admitted"].items():
        assert r["schedule_candidates"][name] == 0 and "micro-batches" in why
    rows = {row["schedule"]: row for row in r["winner_schedules"]}
    assert set(rows) == set(SCHEDULE_NAMES)
    win = r["top"][0]
    assert rows[win["schedule"]]["step_time_s"] == pytest.approx(win["predicted_step_time_s"], rel=1e-6)
    # the winner is the fastest of its schedules that fits with the search's headroom
    fits = [x for x in rows.values() if x["admissible"] and x["peak_memory_gb"] <= 0.95 * 80]
    assert min(fits, key=lambda x: x["step_time_s"])["schedule"] == win["schedule"]
    assert r["schedule_choice"].startswith(f"{win['schedule']} over ")
    assert all("why_not" in x for x in rows.values() if not x["admissible"])


def test_zero_bubble_schedules_trade_memory_for_bubble():
    model = PRESETS["llama3-70b"].with_(seq_len=4096)
    cluster = ClusterSpec("h100-sxm", 64)
    lay = Layout(tp=8, pp=4, dp=2, micro_batch=1, global_batch=64, sharding="zero1")
    prof = load_profile(machine=False)
    rows = {r["schedule"]: r for r in compare_schedules(model, lay, cluster, prof)}
    assert rows["zbh1"]["pp_bubble_s"] < rows["1f1b"]["pp_bubble_s"]
    assert rows["interleaved_zb"]["pp_bubble_s"] < rows["interleaved"]["pp_bubble_s"]
    # deferred weight gradients keep every rank at p micro-batches; 1F1B's last holds one
    assert rows["zbh1"]["mem_last_stage_gb"] > rows["1f1b"]["mem_last_stage_gb"]
    # a V holds the output head on its first rank; DualPipe-V half a micro-batch more
    assert rows["zbv"]["mem_first_stage_gb"] > rows["zbv"]["mem_last_stage_gb"]
    assert rows["dualpipev"]["mem_first_stage_gb"] > rows["zbv"]["mem_first_stage_gb"]
    assert rows["zbv"]["mem_last_stage_gb"] < rows["1f1b"]["mem_first_stage_gb"]  # no embedding, no head
    # Under full recompute a deferred weight-gradient step keeps what the recompute rebuilt:
    # ZB-H1's last rank holds p checkpoints + p rebuilt micro-batches against 1F1B's one
    # checkpoint, more than the (p - 1) whole micro-batches it holds over 1F1B without recompute.
    full = {r["schedule"]: r for r in compare_schedules(model, lay.with_(recompute="full"), cluster, prof)}
    gap_full = full["zbh1"]["mem_last_stage_gb"] - full["1f1b"]["mem_last_stage_gb"]
    assert gap_full > rows["zbh1"]["mem_last_stage_gb"] - rows["1f1b"]["mem_last_stage_gb"] > 0


def test_predict_json_reports_memory_per_stage_for_each_schedule():
    proc = cli_in_process("predict", "--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus", "8", "--pp", "4",
                   "--tp", "2", "--micro-batch", "1", "--global-batch", "16", "--schedule", "zbv", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["layout"]["schedule"] == "zbv"
    assert {"first_stage", "last_stage"} <= set(r["memory_gb"])
    rows = {row["schedule"]: row for row in r["schedules"]}
    assert set(rows) == set(SCHEDULE_NAMES)
    for row in rows.values():
        if row["admissible"]:
            assert row["mem_first_stage_gb"] > 0 and row["mem_last_stage_gb"] > 0
    assert rows["zbv"]["mem_first_stage_gb"] == pytest.approx(r["memory_gb"]["first_stage"])


def test_predict_refuses_a_v_schedule_with_three_stages_per_rank():
    proc = cli_in_process("predict", "--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus", "8", "--pp", "4",
                   "--vpp", "3", "--micro-batch", "1", "--global-batch", "16", "--schedule", "dualpipev")
    assert proc.returncode == 2 and "vpp=3: schedule dualpipev holds two stages per rank" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_megatron_plans_keep_to_1f1b_and_refuse_zero_bubble_in_one_line():
    model = PRESETS["llama3-8b"].with_(seq_len=4096)
    res = search(model, ClusterSpec("h100-sxm", 64), 256, load_profile(machine=False),
                 SearchSpace(framework="megatron-core", executor_only=False,
                             schedules=("1f1b", "interleaved")))
    assert set(res.schedules_evaluated) == {"1f1b", "interleaved"}
    p = Plan(model=model.to_dict(), cluster=dict(accelerator="h100-sxm", num_gpus=8),
             layout=dict(pp=4, dp=2, micro_batch_size=1, global_batch_size=16, schedule="zbv"))
    p.check()
    why = emitters.megatron_unsupported(p)
    assert why and why.startswith("layout.schedule=zbv") and "\n" not in why
    assert "# not emitted: layout.schedule=zbv" in emitters.megatron_args_text(p)
