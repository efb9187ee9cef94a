"""`meshplan launch PLAN --slurm`: write (and with --submit, sbatch) the plan's SLURM script.

The script is the planner's emitter (`planner.emitters.slurm_script`): one srun task per
node running torchrun with `--max-restarts`, so a failed rank restarts the worker group and
`meshplan run` resumes from the newest checkpoint in the run directory.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from costmodels.errors import MeshplanError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("launch", help="write / submit the SLURM batch script of a plan")
    p.add_argument("plan", help="plan.yaml (or the folder holding it)")
    p.add_argument("--slurm", action="store_true", required=True,
                   help="write launch_slurm.sbatch next to the plan")
    p.add_argument("--submit", action="store_true", help="then submit it with sbatch")
    p.add_argument("--out", default=None, help="folder for the script (default: the plan's)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="torchrun restarts per node (default: the emitter's)")
    p.add_argument("--time", default=None, help="SLURM --time limit, e.g. 04:00:00")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from executor.launch import preflight
    from planner.emitters import slurm_script
    from planner.planfile import atomic_write_text, load_plan, save_plan

    plan = load_plan(args.plan, args.override)
    preflight(plan)
    src = Path(args.plan)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    out.mkdir(parents=True, exist_ok=True)
    if args.override or args.out:
        save_plan(plan, out / "plan.yaml")
    path = out / "launch_slurm.sbatch"
    atomic_write_text(path, slurm_script(plan, plan_dir=out, max_restarts=args.max_restarts,
                                         time_limit=args.time))
    path.chmod(0o755)
    print(f"wrote {path}")
    if args.submit:
        sbatch = shutil.which("sbatch")
        if sbatch is None:
            raise MeshplanError("--submit: sbatch not found on PATH; run it on a SLURM login node")
        proc = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
        print(proc.stdout.strip() or proc.stderr.strip())
        return proc.returncode
    return 0
