"""Planning mixture-of-experts models: `meshplan predict --hf-config` counts Mixtral's and
Qwen3-MoE's parameters (total and active) as transformers does, takes the load imbalance as
an input, and prices the token exchange; `meshplan plan` searches ep for Mixtral on 256
H100s within 2 s and writes Megatron's MoE flags (DeepSpeed's config refuses in one line)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cli_in_process
from tests.executor.test_moe import MIXTRAL_8X7B, QWEN3_30B_A3B

# Mixtral-8x7B: 46,702,792,704 (transformers' count); active: 32 layers x 6 idle experts x
# 3 x 4096 x 14336 fewer. Qwen3-30B-A3B: 30,532,122,624; 48 x 120 idle x 3 x 2048 x 768.
COUNTS = {"mixtral": (MIXTRAL_8X7B, 46_702_792_704, 46_702_792_704 - 32 * 6 * 3 * 4096 * 14336),
          "qwen3": (QWEN3_30B_A3B, 30_532_122_624, 30_532_122_624 - 48 * 120 * 3 * 2048 * 768)}


@pytest.mark.parametrize("name", list(COUNTS))
def test_predict_counts_hf_moe_parameters(tmp_path, name):
    cfg, total, active = COUNTS[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    proc = cli_in_process("predict", "--hf-config", str(path), "--gpu", "h100-sxm", "--gpus", "64", "--dp", "64",
                   "--ep", "8", "--seq-len", "4096", "--micro-batch", "1", "--global-batch", "512", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert (r["params"], r["active_params"]) == (total, active)
    assert r["step_time_s"]["moe_comm"] > 0  # dispatch / combine over 8 expert ranks
    worse = cli_in_process("predict", "--hf-config", str(path), "--gpu", "h100-sxm", "--gpus", "64", "--dp", "64",
                    "--ep", "8", "--seq-len", "4096", "--micro-batch", "1", "--global-batch", "512",
                    "--moe-imbalance", "1.5", "--json")
    assert json.loads(worse.stdout)["tokens_per_sec_per_gpu"] < r["tokens_per_sec_per_gpu"]


def test_deepseek_mla_config_is_refused_in_one_line(tmp_path):
    cfg = {**MIXTRAL_8X7B, "model_type": "deepseek_v3", "kv_lora_rank": 512, "q_lora_rank": 1536}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    proc = cli_in_process("predict", "--hf-config", str(path), "--gpu", "h100-sxm", "--gpus", "8")
    assert proc.returncode != 0 and "kv_lora_rank" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_searches_expert_parallelism_for_mixtral(tmp_path):
    proc = cli_in_process("plan", "--model", "mixtral-8x7b", "--gpu", "h100-sxm", "--gpus", "256",
                   "--seq-len", "4096", "--global-batch-tokens", "4M", "--json", "--out", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    eps = {t["ep"] for t in r["top"]}
    assert len(eps) > 1 and eps <= {1, 2, 4, 8}
    assert all(t["runnable_by_executor"] for t in r["top"])
    args = (tmp_path / "p" / "megatron_args.txt").read_text()
    winner = r["top"][0]
    for flag in ("--num-experts 8", "--moe-router-topk 2", f"--expert-model-parallel-size {winner['ep']}",
                 "--moe-grouped-gemm", "--moe-token-dispatcher-type alltoall"):
        assert flag in args, flag
    ds = json.loads((tmp_path / "p" / "deepspeed_config.json").read_text())
    assert list(ds) == ["not_emitted"] and "\n" not in ds["not_emitted"]
