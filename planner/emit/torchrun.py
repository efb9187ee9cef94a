"""torchrun: `meshplan run plan.yaml --out RUN` under torchrun, single node (`--standalone`)
or multi-node (c10d rendezvous on $MASTER_ADDR:$MASTER_PORT)."""

from __future__ import annotations

from costmodels.errors import MeshplanError
from planner.emit.common import (
    DEFAULT_MASTER_PORT,
    FRESH_STORE_PER_ROUND,
    default_restarts,
    file_header,
    node_count,
    on_cpu,
    procs_per_node,
    shell_join,
)
from planner.planfile import Plan

TORCHRUN_FILE = "launch_torchrun.sh"


def torchrun_command(
    plan: Plan,
    plan_path: str = "plan.yaml",
    run_dir: str = "run",
    multi_node: bool | None = None,
    max_restarts: int | None = None,
    master_addr: str = "$MASTER_ADDR",
    master_port: str = "$MASTER_PORT",
    rdzv_id: str = "meshplan",
) -> list[str]:
    """argv of one node's torchrun; `multi_node=None` follows the plan's node count."""
    multi = node_count(plan) > 1 if multi_node is None else multi_node
    restarts = default_restarts(plan) if max_restarts is None else max_restarts
    if restarts < 0:
        raise MeshplanError(f"--max-restarts {restarts}: must be >= 0")
    argv = ["torchrun"]
    if multi:
        argv += [
            "--nnodes", str(node_count(plan)),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{master_addr}:{master_port}",
            "--rdzv-id", rdzv_id,
        ]
    else:
        argv += ["--standalone", "--nnodes", "1"]
    argv += [
        "--nproc-per-node", str(procs_per_node(plan)),
        "--max-restarts", str(restarts),
        "-m", "planner.cli", "run", plan_path, "--out", run_dir,
    ]
    return argv


def torchrun_script(plan: Plan, max_restarts: int | None = None) -> str:
    """A bash script that launches this node's share of the job (run it on every node)."""
    multi = node_count(plan) > 1
    lines = ["#!/usr/bin/env bash", *file_header(plan, "torchrun launcher")]
    lines += [
        "# Usage: bash launch_torchrun.sh   on every node (PLAN and RUN_DIR may be set in the env)",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        'PLAN="${PLAN:-$HERE/plan.yaml}"',
        'RUN_DIR="${RUN_DIR:-$HERE/run}"',
    ]
    if on_cpu(plan):
        # the host's cores split among this node's ranks: the thread count the cost model
        # prices a CPU plan at (`costmodels.hardware.cpu_threads_per_rank`)
        lines += [f"THREADS=$(( $(nproc) / {procs_per_node(plan)} )); [ \"$THREADS\" -ge 1 ] || THREADS=1",
                  'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}"']
    if multi:
        lines += [
            ': "${MASTER_ADDR:?set MASTER_ADDR to the first node (rendezvous host)}"',
            f'MASTER_PORT="${{MASTER_PORT:-{DEFAULT_MASTER_PORT}}}"',
            'RDZV_ID="${RDZV_ID:-meshplan}"',
            *FRESH_STORE_PER_ROUND,
        ]
        argv = torchrun_command(
            plan, "$PLAN", "$RUN_DIR", multi_node=True, max_restarts=max_restarts,
            rdzv_id="$RDZV_ID",
        )
    else:
        argv = torchrun_command(plan, "$PLAN", "$RUN_DIR", multi_node=False,
                                max_restarts=max_restarts)
    lines.append("exec " + shell_join(argv))
    return "\n".join(lines) + "\n"
