"""`meshplan run` trains a mixture-of-experts model on the embedded corpus: with learned
routing and with forced balance the loss falls by >= 25% from the first step over 150 steps,
and every step logs the tokens each expert received, the load imbalance and the losses
(tiny-moe shrunk to 2 layers of width 64, 8 experts, top-2, fp32; ~16 s a run here)."""

from __future__ import annotations

import pytest

from costmodels.presets import PRESETS
from tests.conftest import run_cli
from tests.executor.executor_testlib import make_plan, read_metrics, write_plan

MODEL = PRESETS["tiny-moe"].with_(layers=2, hidden=64, heads=4, kv_heads=2, expert_ffn_hidden=64,
                                  seq_len=64)
ROWS, STEPS = 8, 150


@pytest.mark.parametrize("force_balance", [False, True])
def test_moe_model_trains_and_logs_routing(tmp_path, force_balance):
    plan = make_plan(model=MODEL.to_dict(), layout={"micro_batch_size": ROWS, "global_batch_size": ROWS},
                     train={"max_steps": STEPS, "lr": 3e-3, "warmup_steps": 10, "schedule": "constant",
                            "moe_force_balance": force_balance},
                     checkpoint={"every": 0}, stability={"spike_warmup_steps": 20})
    proc = run_cli("run", str(write_plan(tmp_path, plan)), "--out", str(tmp_path / "run"),
                   "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == STEPS
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-10:]) / 10
    assert last <= 0.75 * first, (first, last)
    slots = ROWS * MODEL.seq_len * MODEL.experts_topk * MODEL.moe_layers
    for r in rows:
        counts = r["moe_tokens_per_expert"]
        assert len(counts) == MODEL.num_experts and sum(counts) == slots
        assert r["moe_drop_frac"] == 0.0 and r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0
        if force_balance:
            assert r["moe_imbalance"] == 1.0 and len(set(counts)) == 1
        else:
            assert r["moe_imbalance"] >= 1.0
    if not force_balance:  # learned routing is not balanced by construction
        assert max(r["moe_imbalance"] for r in rows) > 1.0
