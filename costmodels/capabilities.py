"""What the meshplan executor can run: one contract, read by the planner's search, the
launcher's preflight and every executor strategy.

`unsupported(model, layout)` returns one line naming the field and the fix, or None when
the executor runs the layout exactly as written (every degree, the sharding stage, the
recompute mode and layer count, the schedule and its micro-batch count). The same rules
run vectorised over the search's candidate columns (`refused_mask`; the search enumerates
only layouts `Layout.check_against` accepts), so the planner ranks only layouts the executor
accepts, at numpy speed.

Pure (numpy only, no torch): the planner imports it without the executor installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from costmodels import pipeline
from costmodels.cases import loss_chunks_column
from costmodels.pipeline import SCHEDULE_NAMES
from costmodels.specs import RECOMPUTES, SHARDINGS, Layout, ModelSpec, SpecError

EXECUTOR_PRECISIONS: tuple[str, ...] = ("bf16", "fp32")
ANY_FRAMEWORK_HINT = "or plan with --any-framework for another stack"

Cols = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    """One thing the executor cannot do: `refused(model, cols)` is True on the rows it
    refuses; `message(model, layout)` says which field and what to change."""

    name: str
    refused: Callable[[ModelSpec, Cols], np.ndarray]
    message: Callable[[ModelSpec, Layout], str]


def _i(cols: Cols, key: str) -> np.ndarray:
    return np.asarray(cols[key], dtype=np.int64)


def _grad_accum(cols: Cols) -> np.ndarray:
    return _i(cols, "gbs") // np.maximum(_i(cols, "micro") * _i(cols, "dp"), 1)


def _min_stage_layers(model: ModelSpec, cols: Cols) -> np.ndarray:
    """A lower bound on the layers of the rank with the fewest: the even split
    (`costmodels.pipeline.stage_layer_counts`) gives every chunk at least floor(L / (pp * vpp))."""
    return (model.layers // np.maximum(_i(cols, "pp") * _i(cols, "vpp"), 1)) * _i(cols, "vpp")


def _splits_backward(schedule: Any) -> np.ndarray:
    """Rows whose (effective) schedule runs input- and weight-gradient steps apart."""
    codes = np.asarray(schedule, dtype=np.int64)
    split = np.array([s.splits_backward for s in pipeline.SCHEDULES])
    return split[codes]


def _full(model: ModelSpec, cols: Cols, value: bool) -> np.ndarray:
    return np.full(len(np.asarray(cols["tp"])), bool(value))


RULES: tuple[Rule, ...] = (
    Rule("moe_bias", lambda m, c: _full(m, c, m.is_moe and m.bias),
         lambda m, lay: "model.bias=true: the executor's experts have no biases; set bias=false "
                        f"for a mixture-of-experts model, {ANY_FRAMEWORK_HINT}"),
    Rule("moe_deepspeed", lambda m, c: _full(m, c, m.is_moe) & (np.asarray(c["engine"]) == "deepspeed"),
         lambda m, lay: "layout.engine=deepspeed: mixture-of-experts layers run on the torch "
                        "engine (expert parallelism, grouped GEMMs); set layout.engine=torch"),
    Rule("ep_zero1", lambda m, c: (_i(c, "ep") > 1) & (_i(c, "sharding") == SHARDINGS.index("zero1")),
         lambda m, lay: f"layout.sharding=zero1 with layout.ep={lay.ep}: the ZeRO-1 partition "
                        "spans the dense replicas, not the expert ones; use sharding none, zero2 "
                        "or zero3 with expert parallelism"),
    Rule("ep_hsdp", lambda m, c: (_i(c, "ep") > 1) & (_i(c, "dp_shard") > 0),
         lambda m, lay: f"layout.dp_shard={lay.dp_shard} with layout.ep={lay.ep}: experts shard "
                        "over all their replicas; set layout.dp_shard=0 with expert parallelism"),
    Rule("precision", lambda m, c: ~np.isin(np.asarray(c["precision"]), EXECUTOR_PRECISIONS),
         lambda m, lay: f"train.precision={lay.precision}: the executor trains in bf16 or fp32; "
                        f"use one of those, {ANY_FRAMEWORK_HINT}"),
    Rule("deepspeed_parallel",
         lambda m, c: (np.asarray(c["engine"]) == "deepspeed")
         & ((_i(c, "tp") > 1) | (_i(c, "pp") > 1) | (_i(c, "cp") > 1)),
         lambda m, lay: "layout.engine=deepspeed runs data parallelism only (tp=pp=cp=1); use "
                        "layout.engine=torch for tensor/pipeline/context parallelism"),
    Rule("deepspeed_hsdp", lambda m, c: (np.asarray(c["engine"]) == "deepspeed") & (_i(c, "dp_shard") > 0),
         lambda m, lay: f"layout.dp_shard={lay.dp_shard}: the DeepSpeed engine shards over all of "
                        "dp; set layout.dp_shard=0 or layout.engine=torch"),
    Rule("sp_without_tp", lambda m, c: np.asarray(c["sp"], dtype=bool) & (_i(c, "tp") == 1),
         lambda m, lay: "layout.sequence_parallel=true needs layout.tp > 1; set it to false"),
    Rule("shard_without_replicas",
         lambda m, c: (_i(c, "sharding") > 0) & (_i(c, "dp") * _i(c, "cp") == 1),
         lambda m, lay: f"layout.sharding={lay.sharding} needs dp*cp > 1 replicas to shard over; "
                        "set layout.sharding=none"),
    Rule("hsdp_without_sharding", lambda m, c: (_i(c, "dp_shard") > 0) & (_i(c, "sharding") == 0),
         lambda m, lay: f"layout.dp_shard={lay.dp_shard} shards ZeRO states; it needs "
                        "layout.sharding zero1/zero2/zero3 (or set dp_shard=0)"),
    Rule("dp_shard_one", lambda m, c: _i(c, "dp_shard") == 1,
         lambda m, lay: "layout.dp_shard=1 shards over one rank: set dp_shard=0 (all of dp) or a "
                        "divisor of dp >= 2"),
    Rule("interleaved_without_vpp",
         lambda m, c: (_i(c, "schedule") == SCHEDULE_NAMES.index("interleaved")) & (_i(c, "vpp") == 1),
         lambda m, lay: "layout.schedule=interleaved needs layout.vpp > 1 (virtual stages per "
                        "rank); set vpp or use schedule 1f1b"),
    Rule("tied_pp", lambda m, c: _full(m, c, m.tied_embeddings) & (_i(c, "pp") > 1),
         lambda m, lay: "layout.pp > 1 needs untied embeddings (model.tied_embeddings=false)"),
    Rule("pp_microbatches",
         lambda m, c: (_i(c, "pp") > 1) & ~pipeline.microbatches_admitted(c["schedule"], c["pp"], _grad_accum(c)),
         lambda m, lay: f"{pipeline.microbatch_problem(lay.schedule, lay.pp, lay.vpp, lay.grad_accum)}; "
                        "raise global_batch_size, lower micro_batch_size, or use schedule gpipe"),
    Rule("split_backward_zero3",
         lambda m, c: (_i(c, "pp") > 1) & (_i(c, "sharding") == SHARDINGS.index("zero3"))
         & _splits_backward(c["schedule"]),
         lambda m, lay: f"layout.schedule={lay.effective_schedule} with layout.sharding=zero3: FSDP2 "
                        "reshards each stage after its input-gradient step, before the deferred "
                        "weight-gradient step; use sharding zero2 / zero1 or schedule 1f1b / interleaved"),
    Rule("recompute_layers_mode",
         lambda m, c: (_i(c, "recompute_layers") > 0) & (_i(c, "recompute") != RECOMPUTES.index("full")),
         lambda m, lay: f"layout.recompute_layers={lay.recompute_layers} applies to full "
                        "recompute only; set layout.recompute=full or recompute_layers=0"),
    Rule("recompute_layers_vpp",
         lambda m, c: (_i(c, "recompute_layers") % np.maximum(_i(c, "vpp"), 1)) != 0,
         lambda m, lay: f"layout.recompute_layers={lay.recompute_layers} must be a multiple of "
                        f"the {lay.stages_per_rank} stages per rank: each of a rank's stages recomputes the same "
                        "number of its first blocks (Megatron's --recompute-num-layers per chunk)"),
    Rule("recompute_layers_count",
         lambda m, c: _i(c, "recompute_layers") > _min_stage_layers(m, c),
         lambda m, lay: f"layout.recompute_layers={lay.recompute_layers} exceeds the "
                        f"{int(_min_stage_layers(m, layout_columns(lay))[0])} layers of the "
                        "smallest pipeline stage; lower it (0 = all layers)"),
    Rule("loss_chunks_pp", lambda m, c: (loss_chunks_column(c) > 1) & (_i(c, "pp") > 1),
         lambda m, lay: f"layout.loss_chunks={lay.loss_chunks} with pp={lay.pp}: the pipeline's "
                        "last stage hands its whole logits to the schedule's loss; set loss_chunks=1"),
    Rule("loss_chunks_tp", lambda m, c: (loss_chunks_column(c) > 1) & (_i(c, "tp") > 1),
         lambda m, lay: f"layout.loss_chunks={lay.loss_chunks} with tp={lay.tp}: the output head is "
                        f"vocab-parallel (the logits already split {lay.tp} ways); set loss_chunks=1"),
    Rule("loss_chunks_seq", lambda m, c: (m.seq_len // _i(c, "cp")) % loss_chunks_column(c) != 0,
         lambda m, lay: f"layout.loss_chunks={lay.loss_chunks} must divide the "
                        f"{m.seq_len // lay.cp} tokens of a rank's sequence (equal chunks)"),
)


def layout_columns(layout: Layout) -> Cols:
    """One layout as the search's candidate columns (arrays of length 1)."""
    one = lambda v: np.asarray([v])  # noqa: E731
    return {
        "tp": one(layout.tp), "pp": one(layout.pp), "dp": one(layout.dp), "cp": one(layout.cp),
        "ep": one(layout.ep), "vpp": one(layout.stages_per_rank), "micro": one(layout.micro_batch),
        "gbs": one(layout.global_batch), "sharding": one(SHARDINGS.index(layout.sharding)),
        "recompute": one(RECOMPUTES.index(layout.recompute)), "sp": one(layout.sequence_parallel),
        "schedule": one(SCHEDULE_NAMES.index(layout.effective_schedule)),
        "dp_shard": one(layout.dp_shard), "recompute_layers": one(layout.recompute_layers),
        "precision": one(layout.precision), "engine": one(layout.engine),
        "loss_chunks": one(layout.loss_chunks),
    }


def refused_mask(model: ModelSpec, cols: Cols, rules: tuple[Rule, ...] = RULES) -> np.ndarray:
    """True on the candidate rows `rules` refuse (default: the executor's contract)."""
    out = np.zeros(len(np.asarray(cols["tp"])), dtype=bool)
    for rule in rules:
        out |= np.asarray(rule.refused(model, cols), dtype=bool)
    return out


def first_refusal(model: ModelSpec, layout: Layout, rules: tuple[Rule, ...]) -> str | None:
    """The message of the first of `rules` refusing `layout`, or None."""
    cols = layout_columns(layout)
    for rule in rules:
        if bool(np.asarray(rule.refused(model, cols))[0]):
            return rule.message(model, layout)
    return None


def unsupported(model: ModelSpec, layout: Layout) -> str | None:
    """One line naming the field and the fix, or None when the executor runs `layout`.
    A layout no framework could run (`Layout.check_against`: heads, KV heads, stages per
    layer, context-parallel divisibility) is refused with that check's line first."""
    try:
        layout.check_against(model)
    except SpecError as exc:
        return str(exc)
    return first_refusal(model, layout, RULES)
