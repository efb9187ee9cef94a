"""`meshplan predict` and `meshplan validate`: contract keys, accuracy targets, bad input."""

import json

import pandas as pd
import pytest

from tests.conftest import assert_clean_error, cli_in_process

ROW_KEYS = {
    "run_id", "predicted_tokens_per_sec_per_gpu", "measured_tokens_per_sec_per_gpu", "ape_pct",
    "predicted_peak_memory_gb", "measured_peak_memory_gb", "skipped_reason",
}
SUMMARY_KEYS = {
    "n_scored", "n_skipped", "mape_pct", "median_ape_pct", "within_10pct_share",
    "within_20pct_share", "memory_mape_pct",
}


@pytest.fixture(scope="module")
def validation(published_runs):
    proc = cli_in_process("validate", str(published_runs), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_validate_json_contract(validation, published_runs):
    assert set(validation) >= {"rows", "summary"}
    assert set(validation["summary"]) >= SUMMARY_KEYS
    assert len(validation["rows"]) == len(pd.read_csv(published_runs))
    for row in validation["rows"]:
        assert set(row) >= ROW_KEYS
        assert (row["ape_pct"] is None) == (row["skipped_reason"] is not None)


def test_dense_accuracy_target(validation, published_runs):
    df = pd.read_csv(published_runs)
    dense_measured = set(df[(df.model_type == "dense") & df.measured_tokens_per_sec_per_gpu.notna()].run_id)
    scored = {r["run_id"]: r["ape_pct"] for r in validation["rows"] if r["ape_pct"] is not None}
    dense_scored = [scored[r] for r in dense_measured if r in scored]
    assert len(dense_scored) >= 0.9 * len(dense_measured)
    mape = sum(dense_scored) / len(dense_scored)
    assert mape <= 15.0, mape


def test_cross_validated_halves_stay_accurate(published_runs):
    proc = cli_in_process("validate", str(published_runs), "--json", "--cross-validate", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)["summary"]
    assert s["cross_validated"] is True
    assert s["dense_mape_pct"] <= 15.0


def test_validate_human_table(published_runs):
    proc = cli_in_process("validate", str(published_runs))
    assert proc.returncode == 0, proc.stderr
    assert "llmfoundry_bench" in proc.stdout and "MAPE" in proc.stdout


def test_missing_micro_batch_is_defaulted_not_skipped(tmp_path, published_runs):
    df = pd.read_csv(published_runs).head(3).copy()
    df["micro_batch_size"] = None
    df["recompute"] = None
    p = tmp_path / "runs.csv"
    df.to_csv(p, index=False)
    out = json.loads(cli_in_process("validate", str(p), "--json").stdout)
    assert out["summary"]["n_scored"] == 3
    assert any("micro_batch_size=1" in a for a in out["rows"][0]["assumed"])


def test_validate_bad_inputs(tmp_path, published_runs):
    df = pd.read_csv(published_runs).head(4)
    p = tmp_path / "missing.csv"
    df.drop(columns=["tp"]).to_csv(p, index=False)
    assert_clean_error(cli_in_process("validate", str(p)), "missing column", "tp")
    bad = df.copy()
    bad["hidden_size"] = bad["hidden_size"].astype(object)
    bad.loc[bad.index[1], "hidden_size"] = "lots"
    p2 = tmp_path / "nonnumeric.csv"
    bad.to_csv(p2, index=False)
    assert_clean_error(cli_in_process("validate", str(p2)), "hidden_size", "not a number")
    assert_clean_error(cli_in_process("validate", str(tmp_path / "nope.csv")), "not found")


def test_predict_json_breakdowns():
    proc = cli_in_process("predict", "--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus", "8",
                   "--sharding", "zero3", "--micro-batch", "2", "--global-batch", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    mem = r["memory_gb"]
    parts = sum(mem[k] for k in ("weights", "gradients", "optimizer", "activations", "buffers", "overhead"))
    assert parts == pytest.approx(mem["total"], rel=1e-9)
    assert r["step_time_s"]["total"] > r["step_time_s"]["compute"] > 0
    assert 20 < r["mfu_pct"] < 70
    assert r["layout"]["dp"] == 8


def test_predict_from_yaml(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: llama3-70b\ncluster: {gpu: h100-sxm, gpus: 64}\nlayout: {tp: 8, pp: 2, dp: 4, global_batch: 64, sequence_parallel: true}\n")
    proc = cli_in_process("predict", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layout"]["tp"] == 8


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--model", "llama3-8b", "--gpu", "tpu9", "--gpus", "8"], ["unknown accelerator"]),
        (["--model", "llama3-8b", "--gpus", "8", "--tp", "3"], ["not divisible"]),
        (["--model", "llama3-8b", "--gpus", "6", "--tp", "3", "--dp", "2"], ["divide", "heads"]),
        (["--model", "nosuch", "--gpus", "8"], ["unknown preset"]),
        (["--model", "llama3-8b", "--gpus", "8", "--tp", "2", "--dp", "2"], ["cluster has 8 GPUs"]),
    ],
)
def test_predict_bad_inputs(args, needles):
    assert_clean_error(cli_in_process("predict", *args), *needles)


def _plan_and_predict(tmp_path, *plan_flags, predict_flags=()):
    out = tmp_path / "plan"
    proc = cli_in_process("plan", *plan_flags, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    pred = cli_in_process("predict", "--config", str(out / "plan.yaml"), *predict_flags, "--json")
    assert pred.returncode == 0, pred.stderr
    import yaml

    return yaml.safe_load((out / "plan.yaml").read_text()), json.loads(pred.stdout)


def test_predict_reproduces_the_plans_own_prediction(tmp_path):
    """`meshplan predict --config DIR/plan.yaml` prices the plan with the cluster links, the
    profile and the framework it was written with: the same step time and memory."""
    plan, pred = _plan_and_predict(
        tmp_path, "--model", "llama3-70b", "--gpu", "h100-sxm", "--gpus", "512", "--seq-len", "8192",
        "--global-batch-tokens", "16M")
    assert pred["step_time_s"]["total"] == pytest.approx(plan["predicted"]["step_time_s"], rel=1e-12)
    assert pred["memory_gb"]["total"] == pytest.approx(plan["predicted"]["peak_memory_gb"], rel=1e-12)
    assert pred["matches_plan"] is True
    cl = plan["cluster"]
    assert (cl["scaleup_gbps"], cl["scaleout_gbps"], cl["nvlink_domain"], cl["gpus_per_node"]) == (450.0, 50.0, 8, 8)
    assert plan["profile"]["gemm_eff"]["hopper"] > 0  # the profile travels with the plan
    # a flag still overrides a plan field, and the prediction then moves
    moved = cli_in_process("predict", "--config", str(tmp_path / "plan" / "plan.yaml"), "--nic-gbps", "5", "--json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["step_time_s"]["total"] > pred["step_time_s"]["total"]


def test_predict_reproduces_a_plan_on_a_slow_custom_cluster(tmp_path):
    """Non-catalog links, node size and framework survive the round trip."""
    plan, pred = _plan_and_predict(
        tmp_path, "--model", "llama3-8b", "--gpu", "a100-80gb", "--gpus", "32", "--gpus-per-node", "4",
        "--nvlink-gbps", "100", "--nic-gbps", "6.25", "--seq-len", "4096", "--global-batch-tokens", "2M",
        "--framework", "megatron-core")
    assert (plan["cluster"]["scaleup_gbps"], plan["cluster"]["scaleout_gbps"]) == (100.0, 6.25)
    assert plan["cluster"]["gpus_per_node"] == 4 and pred["framework"] == "megatron-core"
    assert pred["matches_plan"] is True
