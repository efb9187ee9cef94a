"""`meshplan run PLAN --out RUN_DIR`: train the plan (resuming RUN_DIR if it has checkpoints)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from costmodels.errors import MeshplanError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="train a plan (single process, or torchrun for multi-rank layouts)",
        description="Train PLAN into RUN_DIR; a RUN_DIR with checkpoints resumes exactly.",
    )
    p.add_argument("plan", help="plan.yaml (or the folder holding it)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted plan override, e.g. train.max_steps=40 (repeatable)")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                   help="checkpoint and exit at step N, as an interruption would")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes for a multi-rank layout (default: the plan's world size)")
    p.add_argument("--inject-fault", action="append", default=[], metavar="KIND@STEP",
                   help="plant a fault to exercise the stability policy: nan@S, spike@S, "
                        "garbage@S, nangrad@S (a NaN in this rank's gradients; :R for rank R only)"
                        " (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from executor.dir_lock import refuse_if_run_dir_held, run_dir_lock
    from planner.planfile import load_plan

    plan = load_plan(args.plan, args.override, resize_cluster=True)
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise MeshplanError("--stop-after-steps: must be >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MeshplanError(f"--out {out}: exists and is not a folder; pass a folder path")
    refuse_if_run_dir_held(out)  # a second writer learns it before the imports below
    from executor.faults import Fault

    faults = [Fault.parse(f) for f in args.inject_fault]  # a typo fails before anything runs
    if plan.layout.engine == "deepspeed" and any(f.kind == "nangrad" for f in faults):
        raise MeshplanError("--inject-fault nangrad: DeepSpeed keeps its gradients in its own "
                            "buffers; use layout.engine=torch or the nan fault")
    if plan.layout.world_size > 1 and "LOCAL_RANK" not in os.environ:
        from executor.launch import launch_local

        return launch_local(args)  # it holds the lock for its ranks

    with run_dir_lock(out):  # before anything is written (executor.dir_lock)
        return _train(plan, out, args, faults)


def _train(plan, out: Path, args: argparse.Namespace, faults: list) -> int:
    from executor.train import RunOptions, run_training
    from planner.planfile import save_plan

    if plan.cluster.accelerator == "cpu":
        _set_cpu_threads()
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_plan(plan, out / "plan.yaml")
    opts = RunOptions(
        stop_after_steps=args.stop_after_steps,
        faults=faults,
        progress=not args.no_progress,
    )
    summary = run_training(plan, out, opts)
    return 0 if summary["finished"] or summary["interrupted"] else 1


def _set_cpu_threads() -> None:
    """OMP_NUM_THREADS if the user set it, else the host's cores split among the local ranks:
    the thread count the cost model assumes for a CPU plan (costmodels.hardware)."""
    import torch

    from costmodels.hardware import cpu_threads_per_rank
    from executor.host import host_cores

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(env) if env.isdigit() and int(env) > 0 else cpu_threads_per_rank(
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")), host_cores())
    torch.set_num_threads(threads)
