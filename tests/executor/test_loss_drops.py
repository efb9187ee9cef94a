"""The main job's promise: the tiny model on the embedded corpus lowers its loss by >= 30%
from the first step, for each objective, within 5 minutes on this 2-core machine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from executor.train import RunOptions, run_training
from tests.executor.executor_testlib import MICRO, make_plan

BUDGET_S = 300.0  # all three objectives together
_spent: dict[str, float] = {}

# Small models from the tiny family (the same 8192-token BPE). MLM scores only the 15% chosen
# positions, so it gets more rows per step and ties its input and output embeddings as BERT
# does (Devlin et al. 2019): the 10% of chosen tokens left unchanged are then predictable
# from their own embedding, and the loss leaves the unigram plateau within the budget
# (measured here: 8.92 -> 5.66, -36.6%, in 280 steps, 57 s).
SETUP = {
    "clm": (MICRO.to_dict(), 8, 200),
    "fim": (MICRO.to_dict(), 8, 200),
    "mlm": (MICRO.with_(tied_embeddings=True).to_dict(), 32, 280),
}

LR = {"clm": 3e-3, "fim": 3e-3, "mlm": 3e-3}
MIN_DROP = {"clm": 0.30, "fim": 0.30, "mlm": 0.30}


@pytest.mark.parametrize("objective", ["clm", "fim", "mlm"])
def test_tiny_model_loss_drops(tmp_path: Path, objective: str) -> None:
    torch.set_num_threads(2)  # the machine's two cores: this test runs alone in its process
    model, rows, steps = SETUP[objective]
    plan = make_plan(
        model=model,
        layout={"micro_batch_size": rows, "global_batch_size": rows},
        train={"max_steps": steps, "objective": objective, "lr": LR[objective],
               "warmup_steps": 10,
               "schedule": "constant", "precision": "fp32"},
        checkpoint={"every": 0},
        stability={"spike_warmup_steps": 20},  # the loop runs with its guard on
    )
    t0 = time.perf_counter()
    summary = run_training(plan, tmp_path / "run", RunOptions(progress=False))
    _spent[objective] = time.perf_counter() - t0
    losses = [json.loads(x)["loss"] for x in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = losses[0], sum(losses[-10:]) / 10
    print(f"{objective}: {first:.3f} -> {last:.3f} ({1 - last / first:.1%}) "
          f"in {_spent[objective]:.0f} s")
    assert summary["finished"]
    assert last <= (1 - MIN_DROP[objective]) * first, (objective, first, last)
    assert sum(_spent.values()) < BUDGET_S
