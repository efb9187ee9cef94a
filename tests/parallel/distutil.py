"""Run a function on N gloo processes with a hard timeout (a hang fails the test)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Children fork from one server process that has imported these once (the first call
# starts it), instead of each spawned rank importing torch again (~2.5 s of CPU a rank).
PRELOAD = ["torch", "torch.distributed", "executor.train", "executor.parallel.factory"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple,
           env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)  # the caller's environment now, not the fork server's at its start
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: Any
    try:
        from executor.parallel.mesh import init_distributed

        init_distributed(timeout_s=120)
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - shipped back to the parent
        result = ("error", traceback.format_exc())
    finally:
        Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
        if dist.is_initialized():
            from executor.parallel.mesh import release_meshes

            release_meshes()
            dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 240) -> list[Any]:
    """fn(rank, world, *args) on `world` forked processes; returns each rank's result."""
    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_child, args=(r, world, port, out_dir, fn, args, dict(os.environ)),
                        daemon=False)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout}s (hang)")
        results, errors = [], []
        for r in range(world):
            f = Path(out_dir, f"{r}.pkl")
            if not f.exists():
                raise RuntimeError(f"rank {r} died (exit code {procs[r].exitcode})")
            status, value = pickle.loads(f.read_bytes())
            if status != "ok":
                errors.append((r, value))
            results.append(value)
        if errors:  # the rank that failed first, not the peers it left behind
            r, value = next(((r, v) for r, v in errors if "Connection closed by peer" not in v), errors[0])
            raise RuntimeError(f"rank {r} failed:\n{value}")
        return results
