"""Property: every layout the planner's search space holds for the tiny model on <= 8 ranks
is either refused by the capability contract with one line naming a field, or runs (2 steps
on gloo, fp32) with nothing refused or changed by the executor after the contract said yes
(`executor.applied.check_applied` raises on any difference before the first step)."""

from __future__ import annotations

import numpy as np
import pytest
from distutil import run_distributed
from workers import SEQ, contract_worker

from costmodels.capabilities import unsupported
from costmodels.pipeline import SCHEDULE_NAMES as SCHEDULES
from costmodels.presets import PRESETS
from costmodels.specs import RECOMPUTES, SHARDINGS, ClusterSpec
from planner.search import SearchSpace, enumerate_layouts
from tests.scale import scaled

DRAWS = scaled(32, 200)  # the 200 at full scale (`tests.scale`)
SEED = 20261202
MODEL = PRESETS["tiny-mha"].with_(seq_len=SEQ, layers=4)
ROWS = 4  # sequences per step: up to 4 micro-batches, dp up to 4


# World sizes drawn in these proportions (8-rank layouts run in test_three_d, through the
# CLI): the draw leans small to keep the suite inside its budget (the 200 layouts took
# 153 s on 2 cores once the zero-bubble and V schedules joined the space).
WORLD_WEIGHTS = {1: 0.4, 2: 0.5, 4: 0.1}


def draw_layouts(n: int, seed: int) -> list[dict]:
    """n layouts: a world size (`WORLD_WEIGHTS`), then a candidate of the search space for it
    (CP allowed), and one time in twenty the DeepSpeed engine."""
    rng = np.random.default_rng(seed)
    spaces = {g: enumerate_layouts(MODEL, ClusterSpec("cpu", g), ROWS, SearchSpace(allow_cp=True, precision="fp32"))
              for g in WORLD_WEIGHTS}
    out = []
    for _ in range(n):
        g = int(rng.choice(list(WORLD_WEIGHTS), p=list(WORLD_WEIGHTS.values())))
        cols = spaces[g]
        i = int(rng.integers(len(cols["tp"])))
        out.append({
            "tp": int(cols["tp"][i]), "pp": int(cols["pp"][i]), "dp": int(cols["dp"][i]),
            "cp": int(cols["cp"][i]), "vpp": int(cols["vpp"][i]),
            "sharding": SHARDINGS[cols["sharding"][i]], "micro_batch_size": int(cols["micro"][i]),
            "global_batch_size": ROWS, "recompute": RECOMPUTES[cols["recompute"][i]],
            "sequence_parallel": bool(cols["sp"][i]), "schedule": SCHEDULES[cols["schedule"][i]],
            "dp_shard": int(cols["dp_shard"][i]), "recompute_layers": int(cols["recompute_layers"][i]),
            "engine": "deepspeed" if rng.random() < 0.05 else "torch",
        })
    return out


@pytest.mark.ranks8
@pytest.mark.timeout(900)
def test_random_layouts_are_refused_in_one_line_or_run():
    from workers import make_plan

    # the drawn layouts, and TP x PP x CP, which a draw may miss
    tp_pp_cp = {"tp": 2, "pp": 2, "cp": 2, "dp": 1, "micro_batch_size": 2, "global_batch_size": ROWS,
                "sequence_parallel": True, "recompute": "full"}
    layouts = [*draw_layouts(DRAWS, SEED), tp_pp_cp]
    runnable: dict[int, list[dict]] = {}
    refused = 0
    for lay in layouts:
        plan = make_plan(lay, layers=4)
        reason = unsupported(plan.model_spec(), plan.layout_spec())
        if reason is not None:
            assert "\n" not in reason and ("layout." in reason or "train." in reason), reason
            refused += 1
            continue
        world = lay["tp"] * lay["pp"] * lay["dp"] * lay["cp"]
        if lay not in runnable.setdefault(world, []):
            runnable[world].append(lay)
    assert refused > 0 and sum(len(v) for v in runnable.values()) > 0
    for world, lays in sorted(runnable.items()):
        res = run_distributed(contract_worker, world, lays, timeout=800)
        for lay, r in zip(lays, res[0], strict=True):
            assert r["finite"], (lay, r)
