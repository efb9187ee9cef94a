"""`summary.json["applied"]`: what the executor set up for a plan's layout, and the check
that it is exactly what the plan asked for (a difference is an error before the first step,
never a silent change)."""

from __future__ import annotations

from typing import Any

from costmodels.errors import MeshplanError


def applied_layout(lay: Any, mesh_sizes: dict[str, int], sharding: str, grad_sync: str,
                   recomputed_blocks: int, blocks: int, schedule: str, microbatches: int) -> dict[str, Any]:
    """What this rank set up, read from the built objects: the device mesh's dimensions,
    the ZeRO stage its wrappers / optimizer implement, how gradients are reduced, the blocks
    whose recompute flags are set, the pipeline schedule object and its micro-batch count."""
    size = {name: mesh_sizes.get(name, 1) for name in ("pp", "dp_replicate", "dp_shard", "cp", "tp")}
    return {
        "mesh": {k: v for k, v in size.items() if v > 1},
        "groups": {**size, "dp": size["dp_replicate"] * size["dp_shard"]},
        "sharding": sharding,
        "gradient_sync": grad_sync,
        "sequence_parallel": bool(lay.sequence_parallel and size["tp"] > 1),
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
    want_shard = (lay.dp_shard or lay.dp) if lay.sharding != "none" else 1
    if applied["groups"]["dp_shard"] != want_shard:
        wrong.append(f"layout.dp_shard={lay.dp_shard} ({lay.sharding}) but the shard group has "
                     f"{applied['groups']['dp_shard']} ranks")
    replicas = lay.dp * lay.cp
    if applied["sharding"] != (lay.sharding if replicas > 1 else "none"):
        wrong.append(f"layout.sharding={lay.sharding} but {applied['sharding']} was set up")
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
