"""Per-rank bodies of the multi-process fault tests (forked by tests.parallel.distutil)."""

from __future__ import annotations

import math
from typing import Any


def train_with_fault(rank: int, world: int, plan_data: dict[str, Any], run_dir: str,
                     faults: list[str]) -> dict[str, Any]:
    """Train the plan on this rank with planted faults; return every step's decision as
    this rank saw it and a checksum of this rank's parameters at the end."""
    import torch

    from executor.faults import Fault
    from executor.train import RunOptions, Trainer
    from planner.planfile import plan_from_dict

    torch.set_num_threads(1)
    plan = plan_from_dict(plan_data)
    opts = RunOptions(faults=[Fault.parse(f) for f in faults], progress=False,
                      prepare_progress=False, quiet=True)
    trainer = Trainer(plan, run_dir, opts)
    seen: list[dict[str, Any]] = []
    real_step = trainer.train_step

    def train_step(step: int) -> dict[str, Any]:
        rec = real_step(step)
        seen.append({"step": step, "skipped": bool(rec["skipped"]),
                     "reason": rec["skip_reason"], "loss_finite": math.isfinite(rec["loss"]),
                     "faults": rec.get("faults", [])})
        return rec

    trainer.train_step = train_step  # type: ignore[method-assign]
    checksum: dict[str, float] = {}
    real_teardown = trainer.strategy.teardown

    def teardown() -> None:
        total, absum = 0.0, 0.0
        for p in trainer.strategy.model.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            total += float(t.detach().double().sum())
            absum += float(t.detach().double().abs().sum())
        checksum.update(sum=total, abs=absum)
        real_teardown()

    trainer.strategy.teardown = teardown  # type: ignore[method-assign]
    summary = trainer.run()
    return {"rank": rank, "steps": seen, "checksum": checksum,
            "final_loss": summary["final_loss"] if rank == 0 else None}
