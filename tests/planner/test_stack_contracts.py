"""A plan for Megatron-Core ranks only layouts Megatron-Core runs exactly: the search reads
the same rules (`costmodels.stack_contracts`) that the Megatron emitter refuses with, and
the vectorised rules agree with the one-layout form on every candidate."""

from __future__ import annotations

import numpy as np
import pandas as pd

from costmodels.capabilities import refused_mask
from costmodels.pipeline import SCHEDULE_NAMES
from costmodels.presets import PRESETS
from costmodels.specs import RECOMPUTES, SHARDINGS, ClusterSpec
from costmodels.stack_contracts import MEGATRON_RULES, stack_unsupported
from planner import emitters
from planner.plan_sections import layout_section
from planner.planfile import Plan
from planner.profiles import load_profile
from planner.search import SearchSpace, enumerate_layouts, row_to_layout, search

# tied embeddings and experts: both hit Megatron-only rules (FSDP2 needs untied embeddings,
# MoE under TP needs sequence parallelism)
MOE = PRESETS["tiny-moe"].with_(tied_embeddings=True, bias=False, seq_len=256)
CLUSTER = ClusterSpec("h100-sxm", 16)
GBS = 64


def test_vectorised_rules_match_the_one_layout_form():
    cols = enumerate_layouts(MOE, CLUSTER, GBS, SearchSpace(framework="megatron-core", executor_only=False))
    n = len(cols["tp"])
    contract = {**cols, "precision": np.full(n, "bf16"), "engine": np.full(n, "torch")}
    mask = refused_mask(MOE, contract, MEGATRON_RULES)
    assert 0 < mask.sum() < n  # some refused, some not: the comparison has both kinds
    rng = np.random.default_rng(7)
    for i in rng.choice(n, size=min(n, 300), replace=False):
        row = {k: v[i] for k, v in cols.items()}
        row.update(sharding=SHARDINGS[row["sharding"]], recompute=RECOMPUTES[row["recompute"]],
                   schedule=SCHEDULE_NAMES[row["schedule"]])
        lay = row_to_layout(pd.Series(row), GBS, "bf16")
        why = stack_unsupported("megatron-core", MOE, lay)
        assert (why is not None) == bool(mask[i]), (row, why)
        if why:
            assert "\n" not in why and why.startswith(("layout.", "model."))


def _search(contract: bool):
    return search(MOE, CLUSTER, GBS, load_profile(machine=False),
                  SearchSpace(framework="megatron-core", executor_only=False, stack_contract=contract),
                  top=10)


def _megatron_refusals(res) -> list[str]:
    out = []
    for i in range(len(res.ranked)):
        plan = Plan(model=MOE.to_dict(), cluster={"accelerator": "h100-sxm", "num_gpus": 16},
                    layout=layout_section(res.layout(i)))
        why = emitters.megatron_unsupported(plan)
        if why:
            out.append(why)
    return out


def test_megatron_plans_rank_only_what_megatron_runs():
    res = _search(contract=True)
    assert len(res.ranked) > 0 and _megatron_refusals(res) == []
    assert any("refused by its contract" in n for n in res.notes)
    # Without the contract (--any-framework) the same search ranks layouts Megatron refuses.
    assert _megatron_refusals(_search(contract=False))


def test_a_chunked_loss_is_refused_by_megatron_and_torchtitan_in_one_line():
    from planner.emit.torchtitan import torchtitan_unsupported

    plan = Plan(model=PRESETS["llama3-8b"].to_dict(), cluster={"accelerator": "h100-sxm", "num_gpus": 1},
                layout={"loss_chunks": 4})
    for why in (emitters.megatron_unsupported(plan), torchtitan_unsupported(plan)):
        assert why is not None and why.startswith("layout.loss_chunks=4") and "\n" not in why
