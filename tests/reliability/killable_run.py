"""`python -m tests.reliability.killable_run PHASE STEP -- <meshplan args>`: run `meshplan`
and SIGKILL this very process at an exact point, as a crash or an OOM killer would:

* ``step``: right after step STEP's metrics line is written (between checkpoints);
* ``tensors``: while step STEP's checkpoint writes its tensors (model.pt whole, optim.pt
  half-written and flushed);
* ``manifest``: after the checkpoint files, before the manifest;
* ``rename``: after the manifest, before the folder is renamed into place;
* ``renamed``: after the rename, before old checkpoints are pruned.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(phase: str, step: int) -> None:
    import torch

    import executor.checkpoint as ck
    import executor.metrics as metrics
    import executor.strategy as strategy

    if phase == "step":
        real_write = metrics.MetricsLog.write

        def write(self: Any, record: dict[str, Any]) -> None:
            real_write(self, record)
            if record.get("step") == step:
                _die()

        metrics.MetricsLog.write = write  # type: ignore[method-assign]
        return

    def saving(directory: Path) -> bool:
        return Path(directory).name == f".tmp-{ck.step_dir_name(step)}"

    if phase == "tensors":
        real = strategy.write_single_process

        def write_single(directory: Path, model_state: Any, optim_state: Any,
                         extra: Any) -> None:
            if not saving(directory):
                return real(directory, model_state, optim_state, extra)
            torch.save(model_state, Path(directory) / "model.pt")
            buf = io.BytesIO()
            torch.save(optim_state, buf)
            data = buf.getvalue()
            with open(Path(directory) / "optim.pt", "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            _die()

        strategy.write_single_process = write_single
    elif phase in ("manifest", "rename"):
        real_manifest = ck.write_manifest

        def write_manifest(directory: Path, s: int) -> None:
            if saving(directory) and phase == "manifest":
                _die()
            real_manifest(directory, s)
            if saving(directory) and phase == "rename":
                _die()

        ck.write_manifest = write_manifest
    elif phase == "renamed":
        real_fsync = ck.fsync_dir

        def fsync_dir(path: Path) -> None:
            real_fsync(path)
            if (Path(path) / ck.step_dir_name(step)).is_dir():
                _die()

        ck.fsync_dir = fsync_dir
    else:
        raise SystemExit(f"unknown phase {phase}")


def main() -> int:
    phase, step, sep, *args = sys.argv[1:]
    assert sep == "--"
    install(phase, int(step))
    from planner.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
