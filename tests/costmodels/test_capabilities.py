"""The executor's capability contract (`costmodels.capabilities`): one line per refusal, the
same answer row by row and vectorised, and the planner's search ranks only what it allows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from costmodels.capabilities import RULES, layout_columns, refused_mask, unsupported
from costmodels.pipeline import SCHEDULE_NAMES as SCHEDULES
from costmodels.presets import PRESETS
from costmodels.specs import RECOMPUTES, SHARDINGS, ClusterSpec, Layout
from planner.profiles import load_profile
from planner.search import SearchSpace, enumerate_layouts, row_to_layout, search

TINY = PRESETS["tiny"]  # 4 layers, 4 heads, 2 KV heads
MOE = TINY.with_(num_experts=8, experts_topk=2, expert_ffn_hidden=256)


@pytest.mark.parametrize("layout", [
    Layout(tp=2, pp=2, dp=2, global_batch=8, micro_batch=1, sequence_parallel=True),
    Layout(cp=2, pp=2, dp=2, global_batch=8, micro_batch=1),
    Layout(tp=4, dp=2, sharding="zero2", global_batch=4),  # tp > kv_heads: KV replicated
    Layout(pp=2, dp=4, dp_shard=2, sharding="zero3", global_batch=8),
    Layout(pp=2, vpp=2, tp=2, dp=2, sharding="zero1", global_batch=8),
    Layout(pp=2, global_batch=1, schedule="gpipe"),  # GPipe runs one micro-batch
    Layout(recompute="full", recompute_layers=2, global_batch=2),
])
def test_supported_layouts(layout):
    assert unsupported(TINY, layout) is None


@pytest.mark.parametrize("layout", [
    Layout(ep=2, dp=2, global_batch=2),
    Layout(ep=2, tp=2, dp=2, sequence_parallel=True, global_batch=2),
    Layout(ep=4, pp=2, dp=2, cp=2, sharding="zero3", global_batch=4),
])
def test_supported_expert_parallel_layouts(layout):
    assert unsupported(MOE, layout) is None


GQA12 = TINY.with_(hidden=768, heads=12, kv_heads=4)
REFUSALS = [
    (Layout(tp=3), TINY, "layout.tp=3"),
    (Layout(tp=6), GQA12, "kv_heads=4"),
    (Layout(engine="deepspeed", tp=2), TINY, "layout.engine=deepspeed"),
    (Layout(engine="deepspeed", dp=4, dp_shard=2, sharding="zero3", global_batch=4), TINY, "layout.dp_shard=2"),
    (Layout(precision="fp8"), TINY, "train.precision=fp8"),
    (Layout(sequence_parallel=True), TINY, "layout.sequence_parallel"),
    (Layout(sharding="zero3"), TINY, "layout.sharding=zero3"),
    (Layout(dp=2, dp_shard=2, global_batch=2), TINY, "layout.dp_shard=2"),
    (Layout(pp=2, global_batch=1), TINY, "layout.schedule=1f1b"),
    (Layout(pp=8, global_batch=8), TINY, "layout.pp*vpp=8"),
    (Layout(pp=2, recompute="full", recompute_layers=3, global_batch=2), TINY, "layout.recompute_layers=3"),
    (Layout(recompute="selective", recompute_layers=1), TINY, "layout.recompute_layers=1"),
    (Layout(pp=2, global_batch=2), TINY.with_(tied_embeddings=True), "tied"),
    (Layout(), MOE.with_(bias=True), "model.bias=true"),
    (Layout(engine="deepspeed", dp=2, global_batch=2), MOE, "layout.engine=deepspeed"),
    (Layout(ep=2, dp=2, sharding="zero1", global_batch=2), MOE, "layout.sharding=zero1"),
    (Layout(ep=2, dp=4, dp_shard=2, sharding="zero3", global_batch=4), MOE, "layout.dp_shard=2"),
    (Layout(ep=2, dp=2, global_batch=2), TINY, "layout.ep=2"),
    (Layout(ep=3, dp=3, global_batch=3), MOE, "layout.ep=3"),
    (Layout(pp=2, vpp=2, recompute="full", recompute_layers=1, global_batch=2), TINY, "multiple of the 2 stages per rank"),
    (Layout(dp=4, dp_shard=1, sharding="zero2", global_batch=4), TINY, "layout.dp_shard=1"),
    (Layout(pp=2, schedule="interleaved", global_batch=2), TINY, "layout.schedule=interleaved"),
    (Layout(pp=2, dp=2, sharding="zero3", schedule="zbv", global_batch=8), TINY, "zbv with layout.sharding=zero3"),
    (Layout(pp=2, loss_chunks=4, global_batch=2), TINY, "layout.loss_chunks=4 with pp=2"),
    (Layout(tp=2, loss_chunks=4), TINY, "layout.loss_chunks=4 with tp=2"),
    (Layout(cp=2, loss_chunks=1000), TINY, "layout.loss_chunks=1000 must divide"),
]


@pytest.mark.parametrize("layout, model, field", REFUSALS)
def test_refusals_name_the_field_in_one_line(layout, model, field):
    reason = unsupported(model, layout)
    assert reason is not None and field in reason and "\n" not in reason, reason


@pytest.mark.parametrize("model", [TINY, TINY.with_(tied_embeddings=True)], ids=["untied", "tied"])
def test_vectorised_rules_agree_with_the_scalar_contract(model):
    cluster = ClusterSpec("cpu", 8)
    cols = enumerate_layouts(model, cluster, 16, SearchSpace(allow_cp=True))
    n = len(cols["tp"])
    full = {**cols, "precision": np.full(n, "fp32"), "engine": np.full(n, "torch")}
    mask = refused_mask(model, full)
    assert 0 < mask.sum() < n  # e.g. zero-bubble schedules under zero3; tied-embedding pipelines
    names = {"sharding": SHARDINGS, "recompute": RECOMPUTES, "schedule": SCHEDULES}
    for i in np.random.default_rng(0).choice(n, 300, replace=False):
        row = pd.Series({k: (names[k][v[i]] if k in names else v[i]) for k, v in cols.items()})
        lay = row_to_layout(row, 16, "fp32")
        assert (unsupported(model, lay) is not None) == bool(mask[i]), (lay, unsupported(model, lay))
        one = refused_mask(model, layout_columns(lay))
        assert bool(one[0]) == bool(mask[i])


def test_search_ranks_only_runnable_layouts_unless_any_framework():
    prof = load_profile(machine=False)
    cluster = ClusterSpec("cpu", 8)
    space = SearchSpace(precision="fp32", allow_cp=True)
    res = search(TINY, cluster, 16, prof, space, top=50)
    assert len(res.ranked)
    for i in range(len(res.ranked)):
        assert unsupported(TINY, res.layout(i)) is None
    assert res.table["runnable"].all()
    # other stacks' layouts stay searchable (tied embeddings: pipelines the executor refuses)
    free = search(TINY.with_(tied_embeddings=True), cluster, 16, prof,
                  SearchSpace(precision="fp32", allow_cp=True, executor_only=False), top=50)
    assert (~free.table["runnable"]).any()


def test_every_rule_is_exercised():
    fired = set()
    for layout, model, _ in REFUSALS:
        cols = layout_columns(layout)
        fired |= {r.name for r in RULES if bool(np.asarray(r.refused(model, cols))[0])}
    assert fired == {r.name for r in RULES}
