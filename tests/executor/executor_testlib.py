"""Helpers for the executor tests: small plans on the embedded corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from costmodels.presets import PRESETS
from planner.planfile import Plan, plan_from_dict, save_plan

# A model small enough for many short CPU runs; the vocab matches the cached corpus BPE.
MICRO = PRESETS["tiny"].with_(name="micro", layers=2, hidden=64, ffn_hidden=176, heads=4,
                              kv_heads=2, seq_len=64)


def make_plan(model: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Plan:
    data: dict[str, Any] = {
        "model": model or MICRO.to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": 1, "gpus_per_node": 1},
        "layout": {"micro_batch_size": 4, "global_batch_size": 4},
        "train": {"max_steps": 40, "precision": "fp32", "lr": 1e-3, "seed": 7},
        "checkpoint": {"every": 10, "keep": 3},
        "stability": {"spike_warmup_steps": 10},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return plan_from_dict(data)


def write_plan(tmp_path: Path, plan: Plan) -> Path:
    return save_plan(plan, tmp_path / "plan")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

