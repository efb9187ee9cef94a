"""`meshplan launch PLAN --slurm`: write (and with --submit, sbatch) the plan's SLURM script.

The script is the planner's emitter (`planner.emitters.slurm_script`): one srun task per
node running torchrun with `--max-restarts`, so a failed rank restarts the worker group and
`meshplan run` resumes from the newest checkpoint in the run directory.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

from costmodels.errors import MeshplanError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("launch", help="write / submit the SLURM batch script of a plan")
    p.add_argument("plan", help="plan.yaml (or the folder holding it)")
    p.add_argument("--slurm", action="store_true",
                   help="write launch_slurm.sbatch next to the plan")
    p.add_argument("--submit", action="store_true", help="then submit it with sbatch (prints the job id)")
    p.add_argument("--status", action="store_true",
                   help="the submitted job's SLURM state and the run's last logged step")
    p.add_argument("--out", default=None, help="folder for the script (default: the plan's)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="torchrun restarts per node (default: the emitter's)")
    p.add_argument("--time", default=None, help="SLURM --time limit, e.g. 04:00:00")
    p.set_defaults(func=handle)


JOB_FILE = "slurm_job.json"  # written next to the script at --submit: job id, script, run dir


def _folder(args: argparse.Namespace) -> Path:
    src = Path(args.out or args.plan)
    return src if src.is_dir() else src.parent


def handle(args: argparse.Namespace) -> int:
    if args.status:
        return _status(_folder(args))
    if not args.slurm:
        raise MeshplanError("meshplan launch: pass --slurm (write / --submit the batch script) "
                            "or --status (the submitted job's state)")
    from executor.launch import preflight
    from planner.atomic import atomic_write_text
    from planner.emitters import slurm_script
    from planner.planfile import load_plan, save_plan

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
        proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            first = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[0]
            raise MeshplanError(f"--submit: sbatch refused {path} ({first})")
        job_id = proc.stdout.strip().split(";")[0]
        atomic_write_text(out / JOB_FILE, json.dumps(
            {"job_id": job_id, "script": str(path), "run_dir": str(out / "run")}) + "\n")
        print(f"submitted job {job_id}")
    return 0


def _status(folder: Path) -> int:
    """The job's state (`scontrol show job`) and the last step its run logged."""
    from executor.metrics import last_logged_step

    record = folder / JOB_FILE
    if not record.is_file():
        raise MeshplanError(f"--status: {record} not found; submit with `meshplan launch PLAN "
                            "--slurm --submit` first")
    job = json.loads(record.read_text())
    scontrol = shutil.which("scontrol")
    state = "UNKNOWN (scontrol not on PATH)"
    if scontrol:
        proc = subprocess.run([scontrol, "show", "job", job["job_id"]], capture_output=True, text=True)
        m = re.search(r"JobState=(\S+)", proc.stdout)
        state = m.group(1) if m else "UNKNOWN (the controller no longer lists it)"
    step = last_logged_step(Path(job["run_dir"]) / "metrics.jsonl")
    print(json.dumps({"job_id": job["job_id"], "state": state, "run_dir": job["run_dir"],
                      "last_step": step}))
    return 0
