"""`torchrun ... -m tests.reliability.rank_faults KILL... -- run PLAN --out RUN`: each rank runs
`meshplan` and SIGKILLs itself at a planted point, as a crashed device or the OOM killer would.

A KILL is `WHERE:ATTEMPT:RANK:STEP` and fires on global rank RANK during torchrun attempt
ATTEMPT (`TORCHELASTIC_RESTART_COUNT`) only, so the restarted group runs on:

* ``step``: as the rank enters step STEP (its peers are inside that step's collectives);
* ``save``: in step STEP's distributed-checkpoint save, after this rank wrote its shards and
  before the save is finished (the other ranks are still writing or waiting on it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tests.reliability.killable_run import _die


def install(where: str, step: int) -> None:
    if where == "step":
        import executor.train as train

        real_step = train.Trainer.train_step

        def train_step(self: Any, s: int) -> dict[str, Any]:
            if s == step:
                _die()
            return real_step(self, s)

        train.Trainer.train_step = train_step  # type: ignore[method-assign]
    elif where == "save":
        from torch.distributed.checkpoint import FileSystemWriter

        import executor.checkpoint as ck

        real_write = FileSystemWriter.write_data

        def write_data(self: Any, plan: Any, planner: Any) -> Any:
            fut = real_write(self, plan, planner)
            if Path(str(self.path)).name == f".tmp-{ck.step_dir_name(step)}":
                fut.wait()
                _die()
            return fut

        FileSystemWriter.write_data = write_data  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown kill point {where}")


def main() -> int:
    sep = sys.argv.index("--")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    for spec in sys.argv[1:sep]:
        where, a, r, s = spec.split(":")
        if int(a) == attempt and int(r) == rank:
            install(where, int(s))
    from planner.cli import main as cli_main

    return cli_main(sys.argv[sep + 1:])


if __name__ == "__main__":
    sys.exit(main())
