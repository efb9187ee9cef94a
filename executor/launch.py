"""Start a multi-rank plan on this machine under torchrun (`meshplan run` with world size > 1).

Everything that can be checked without a process group is checked first (`preflight`), so
a misconfigured layout fails with one line before any process starts. Then the same
`meshplan run` command line is re-executed by `python -m torch.distributed.run --standalone`
with the plan's process count (or `--nproc`), gloo on the CPU with the host's cores split
among the ranks (OMP_NUM_THREADS, unless set), `--max-restarts` (env MESHPLAN_MAX_RESTARTS, default 0) and an optional wall-clock timeout
(env MESHPLAN_LAUNCH_TIMEOUT_S). The launcher holds the run directory's lock
(`executor.dir_lock`) for every rank and restart it starts. A restarted worker group resumes from the newest intact
checkpoint in the run directory, so a killed rank costs at most the steps since then.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from costmodels.errors import MeshplanError
from executor.dir_lock import HELD_ENV, dir_lock
from executor.process_group import stop_process_group
from planner.planfile import Plan


def preflight(plan: Plan, nproc: int | None = None) -> int:
    """Check the layout against the processes to start and the executor; returns nproc."""
    lay = plan.layout
    spec = plan.model_spec()
    world = lay.tp * lay.pp * lay.dp * lay.cp
    n = world if nproc is None else nproc
    if n < 1:
        raise MeshplanError(f"--nproc {n}: must be >= 1")
    if n != world:
        raise MeshplanError(
            f"--nproc {n}: the layout needs tp*pp*dp*cp = {lay.tp}*{lay.pp}*{lay.dp}*{lay.cp} "
            f"= {world} processes; pass --nproc {world} or change the layout's degrees"
        )
    from costmodels.capabilities import unsupported
    from executor.compile import compile_refusal

    reason = unsupported(spec, plan.layout_spec()) or compile_refusal(plan)
    if reason is not None:  # the executor's capability contract (costmodels.capabilities)
        raise MeshplanError(reason)
    if lay.engine == "deepspeed":
        from executor.parallel.deepspeed_engine import deepspeed_available

        if not deepspeed_available():
            raise MeshplanError(
                "layout.engine=deepspeed: DeepSpeed is not installed; "
                "pip install 'meshplan[deepspeed]' or set layout.engine=torch"
            )
    from costmodels.lr_schedule import LRSchedule
    from executor.strategy import autocast_dtype

    LRSchedule.from_train(plan.train)  # the workers' own checks, before any process starts
    autocast_dtype(plan.train.precision)
    if lay.pp > 1 and plan.train.eval_every:
        raise MeshplanError(
            "train.eval_every with layout.pp > 1 is not supported yet; set train.eval_every=0"
        )
    return n


def _rebuild_run_argv(args: argparse.Namespace) -> list[str]:
    """The `meshplan run ...` arguments of `args`, without --nproc (for the workers)."""
    from executor.commands.run import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    run_parser = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction)).choices["run"]
    argv: list[str] = ["run"]
    for action in run_parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in ("nproc", "func"):
            continue
        value = getattr(args, action.dest, action.default)
        if not action.option_strings:
            argv.append(str(value))
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value or []:
                argv += [flag, str(item)]
        elif value is not None and value != action.default or action.required:
            argv += [flag, str(value)]
    return argv


def torchrun_argv(nproc: int, run_argv: list[str], max_restarts: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
        "-m", "planner.cli", *run_argv,
    ]


def launch_local(args: argparse.Namespace) -> int:
    from planner.planfile import load_plan

    plan = load_plan(args.plan, list(getattr(args, "override", []) or []), resize_cluster=True)
    nproc = preflight(plan, getattr(args, "nproc", None))
    restarts = int(os.environ.get("MESHPLAN_MAX_RESTARTS", "0"))
    timeout = float(os.environ.get("MESHPLAN_LAUNCH_TIMEOUT_S", "0")) or None
    env = dict(os.environ)
    if plan.cluster.accelerator == "cpu":
        # Split the host's cores among the ranks (torchrun would otherwise pin each to 1).
        from costmodels.hardware import cpu_threads_per_rank
        from executor.host import host_cores

        env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(nproc, host_cores())))
    else:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if plan.layout.engine == "deepspeed":
        env.setdefault("DS_ACCELERATOR", "cpu" if plan.cluster.accelerator == "cpu" else "cuda")
    cmd = torchrun_argv(nproc, _rebuild_run_argv(args), restarts)
    out = Path(args.out)
    # Held for every rank and restart it starts; torchrun holds the lock file open too, so the
    # directory stays locked while it lives even if this process is killed.
    with dir_lock(out, "--out") as lock:
        env[HELD_ENV] = str(out.resolve())
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=(lock.fileno(),))
        return _wait(proc, timeout)


def _forward_signals(proc: subprocess.Popen) -> dict[int, object]:
    """SIGTERM / SIGHUP to this launcher go to torchrun's whole group (which stops its
    workers), so the lock is released only once they are gone; the previous handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _wait(proc: subprocess.Popen, timeout: float | None) -> int:
    previous = _forward_signals(proc)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc, 30)
        print(f"meshplan: error: run exceeded MESHPLAN_LAUNCH_TIMEOUT_S={timeout:g}s; "
              "workers stopped", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
