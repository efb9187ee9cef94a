"""`summary.json["applied"]`: what the executor set up for a plan's layout, and the check
that it is exactly what the plan asked for (a difference is an error before the first step,
never a silent change)."""

from __future__ import annotations

from typing import Any

from costmodels.errors import MeshplanError
from executor.parallel.mesh import ParallelDims


def applied_layout(lay: Any, dims: ParallelDims, grad_sync: str, recomputed_blocks: int,
                   blocks: int, schedule: str, microbatches: int) -> dict[str, Any]:
    """What this rank set up: the mesh, each dimension's group size, the data-parallel form,
    the recompute mode and layer count, the schedule and its micro-batch count."""
    return {
        "mesh": {k: v for k, v in dims.mesh_degrees().items() if v > 1},
        "groups": {name: dims.size(name) for name in ("pp", "dp", "dp_replicate", "dp_shard",
                                                       "cp", "tp")},
        "sharding": lay.sharding,
        "gradient_sync": grad_sync,
        "sequence_parallel": bool(lay.sequence_parallel and dims.tp > 1),
        "recompute": lay.recompute if recomputed_blocks else "none",
        # The plan's convention: blocks of this rank under full recompute, 0 = all of them.
        "recompute_layers": recomputed_blocks if 0 < recomputed_blocks < blocks and lay.recompute == "full" else 0,
        "recomputed_blocks": recomputed_blocks,
        "blocks_on_rank": blocks,
        "schedule": schedule,
        "microbatches_per_step": microbatches,
    }


def check_applied(lay: Any, applied: dict[str, Any]) -> None:
    """Raise when what was set up differs from the plan's layout (never a silent change)."""
    blocks = applied["blocks_on_rank"]
    want_rc = {"none": 0, "selective": blocks,
               "full": min(lay.recompute_layers or blocks, blocks)}[lay.recompute]
    got_rc = applied["recomputed_blocks"]
    wrong = []
    for name in ("pp", "dp", "cp", "tp"):
        if applied["groups"][name] != getattr(lay, name):
            wrong.append(f"layout.{name}={getattr(lay, name)} but the mesh has {applied['groups'][name]}")
    if lay.sharding != "none" and lay.dp_shard and applied["groups"]["dp_shard"] != lay.dp_shard:
        wrong.append(f"layout.dp_shard={lay.dp_shard} but the shard group has {applied['groups']['dp_shard']}")
    if got_rc != want_rc or (want_rc and applied["recompute"] != lay.recompute):
        wrong.append(f"layout.recompute={lay.recompute} (recompute_layers={lay.recompute_layers}) "
                     f"but {got_rc} of {blocks} blocks recompute ({applied['recompute']})")
    if lay.pp > 1 and applied["schedule"] != lay.effective_schedule:
        wrong.append(f"layout.schedule={lay.effective_schedule} but the pipeline runs {applied['schedule']}")
    if applied["microbatches_per_step"] != lay.grad_accum:
        wrong.append(f"{lay.grad_accum} micro-batches per step planned but "
                     f"{applied['microbatches_per_step']} run")
    if wrong:
        raise MeshplanError("executor: the layout set up differs from the plan: " + "; ".join(wrong)
                            + "; this is a bug in meshplan's capability contract, please report it")
