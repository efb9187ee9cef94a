"""SLURM: an sbatch script that runs torchrun once per node through srun, with threads pinned
the way the cost model assumes (cores per task split among the node's ranks)."""

from __future__ import annotations

from pathlib import Path

from planner.emit.common import (
    CPUS_PER_GPU,
    DEFAULT_MASTER_PORT,
    FRESH_STORE_PER_ROUND,
    dq,
    file_header,
    node_count,
    on_cpu,
    procs_per_node,
    shell_join,
)
from planner.emit.torchrun import torchrun_command
from planner.planfile import Plan

SLURM_FILE = "launch_slurm.sbatch"


def slurm_script(
    plan: Plan,
    plan_dir: str | Path = ".",
    job_name: str | None = None,
    cpus_per_task: int | None = None,
    max_restarts: int | None = None,
    time_limit: str | None = None,
) -> str:
    """sbatch script: one srun task per node, each running torchrun for its GPUs.

    MASTER_ADDR is the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`.
    """
    nodes, per_node = node_count(plan), procs_per_node(plan)
    cpus = cpus_per_task or (per_node if on_cpu(plan) else per_node * CPUS_PER_GPU)
    name = job_name or f"meshplan-{plan.model.get('name', 'job')}"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1"]
    if not on_cpu(plan):
        lines.append(f"#SBATCH --gpus-per-node={per_node}")
    # --requeue: a preempted or requeued job starts again and `meshplan run` resumes from the
    # newest intact checkpoint; append, so the requeued run's output follows the first one's.
    lines += [f"#SBATCH --cpus-per-task={cpus}", "#SBATCH --output=slurm-%j.out",
              "#SBATCH --requeue", "#SBATCH --open-mode=append"]
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    if not on_cpu(plan):
        lines.append("#SBATCH --exclusive")
    lines += file_header(plan, "SLURM batch script")
    lines += [
        "# Usage: sbatch launch_slurm.sbatch   (PLAN_DIR defaults to where the plan was written)",
        "set -euo pipefail",
        f'PLAN_DIR="${{PLAN_DIR:-{dq(str(Path(plan_dir).resolve()))}}}"',
        'PLAN="${PLAN:-$PLAN_DIR/plan.yaml}"',
        'RUN_DIR="${RUN_DIR:-$PLAN_DIR/run}"',
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'MASTER_PORT="${{MASTER_PORT:-{DEFAULT_MASTER_PORT}}}"',
        "export MASTER_ADDR MASTER_PORT",
        *FRESH_STORE_PER_ROUND,
    ]
    if on_cpu(plan):  # each rank gets its share of the task's cores (what the cost model assumes)
        lines.append(f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{max(1, cpus // per_node)}}}"')
    argv = torchrun_command(
        plan, "$PLAN", "$RUN_DIR", multi_node=True, max_restarts=max_restarts,
        rdzv_id="$SLURM_JOB_ID",
    )
    argv[argv.index("--nnodes") + 1] = "$SLURM_NNODES"
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    lines.append(shell_join(srun + argv))
    return "\n".join(lines) + "\n"
