"""What other training stacks cannot run exactly, in the executor contract's form
(`costmodels.capabilities.Rule`): the search ranks only layouts the plan's stack accepts,
and its emitter refuses the rest with the same line, so the two cannot disagree.

Megatron-Core 0.19.x (`megatron/training/arguments.py` validate_args, and the FSDP2 path's
checks); NeMo and Megatron-Bridge launch Megatron-Core and inherit its rules. Stacks without
an entry here have no contract: their plans are ranked over every layout.
"""

from __future__ import annotations

import numpy as np

from costmodels.capabilities import Cols, Rule, first_refusal
from costmodels.cases import loss_chunks_column
from costmodels.pipeline import SCHEDULE_NAMES
from costmodels.specs import RECOMPUTES, SHARDINGS, Layout, ModelSpec
from costmodels.stacks import MEGATRON_SCHEDULES


def _i(cols: Cols, key: str) -> np.ndarray:
    return np.asarray(cols[key], dtype=np.int64)


def _zero3(cols: Cols) -> np.ndarray:
    return _i(cols, "sharding") == SHARDINGS.index("zero3")


_MEGATRON_SCHEDULE_CODES = np.array([SCHEDULE_NAMES.index(s) for s in MEGATRON_SCHEDULES])

MEGATRON_RULES: tuple[Rule, ...] = (
    Rule("megatron_schedule",
         lambda m, c: (_i(c, "pp") > 1) & ~np.isin(_i(c, "schedule"), _MEGATRON_SCHEDULE_CODES),
         lambda m, lay: f"layout.schedule={lay.effective_schedule}: Megatron-LM pipelines run "
                        f"{' / '.join(MEGATRON_SCHEDULES)} only; plan with schedule 1f1b (vpp > 1 "
                        "for interleaved) for Megatron, or launch with meshplan's executor"),
    Rule("megatron_moe_tp_sp",
         lambda m, c: np.full(len(_i(c, "tp")), m.is_moe) & (_i(c, "tp") > 1)
         & ~np.asarray(c["sp"], dtype=bool),
         lambda m, lay: "layout.sequence_parallel=false: Megatron-Core runs MoE layers under tensor "
                        "parallelism only with sequence parallelism; set layout.sequence_parallel=true"),
    Rule("megatron_fsdp_tied",
         lambda m, c: _zero3(c) & m.tied_embeddings,
         lambda m, lay: "model.tied_embeddings=true: Megatron-Core's FSDP2 path (--use-torch-fsdp2) "
                        "needs untied input and output embeddings; untie them, or plan with zero1/zero2"),
    Rule("megatron_fsdp_pp",
         lambda m, c: _zero3(c) & (_i(c, "pp") > 1),
         lambda m, lay: f"layout.pp={lay.pp}: Megatron-Core's FSDP2 path (--use-torch-fsdp2) does not "
                        "run with pipeline parallelism; plan zero1/zero2 with pp, or pp=1 with zero3"),
    Rule("megatron_fsdp_hsdp",
         lambda m, c: _zero3(c) & (_i(c, "dp_shard") > 0) & (_i(c, "dp_shard") < _i(c, "dp")),
         lambda m, lay: f"layout.dp_shard={lay.dp_shard}: Megatron-Core's FSDP2 path shards over all "
                        "of dp; set layout.dp_shard=0, or plan zero1/zero2 (distributed-optimizer instances)"),
    Rule("megatron_recompute_per_chunk",
         lambda m, c: (_i(c, "recompute") == RECOMPUTES.index("full"))
         & (_i(c, "recompute_layers") % np.maximum(_i(c, "vpp"), 1) != 0),
         lambda m, lay: f"layout.recompute_layers={lay.recompute_layers}: Megatron-LM's "
                        "--recompute-num-layers counts per virtual chunk; use a multiple of "
                        f"vpp={lay.stages_per_rank}"),
    Rule("megatron_loss_chunks",
         lambda m, c: loss_chunks_column(c) > 1,
         lambda m, lay: f"layout.loss_chunks={lay.loss_chunks}: Megatron-LM computes its "
                        "(vocab-parallel) loss over whole micro-batches; set loss_chunks=1"),
)

STACK_RULES: dict[str, tuple[Rule, ...]] = {"megatron-core": MEGATRON_RULES, "nemo": MEGATRON_RULES}


def stack_rules(framework: str) -> tuple[Rule, ...]:
    """The rules of `framework`'s contract (empty where it has none)."""
    return STACK_RULES.get(framework, ())


def stack_unsupported(framework: str, model: ModelSpec, layout: Layout) -> str | None:
    """Why `framework` cannot run `layout` exactly (one line naming the field), or None."""
    return first_refusal(model, layout, stack_rules(framework))
