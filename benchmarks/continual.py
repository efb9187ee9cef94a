"""Continual pretraining: how much each remedy cuts forgetting, on the CPU with a tiny model.

    python benchmarks/continual.py            # table
    python benchmarks/continual.py --json     # one JSON object keyed by remedy

Pretrains a 2-layer model on `english` (pydoc topics), then continues it on `code`
(stdlib source) for the same number of steps under: no remedy, 15% replay, a lower peak LR
(x0.2, re-warmed), EWC, and replay + lower LR. Reports, per remedy, the increase of the
held-out `english` loss (forgetting) and the held-out `code` loss reached. About 3-5
minutes on two idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from executor.forgetting import REMEDIES, ForgettingConfig, run_all  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = ForgettingConfig()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="keep the runs in this folder (default: a temporary one)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    for f in fields(ForgettingConfig):
        if f.name == "model":
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = ForgettingConfig(**{f.name: getattr(args, f.name) for f in fields(ForgettingConfig)
                              if f.name != "model"})
    if args.out:
        results = run_all(cfg, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="meshplan-continual-") as tmp:
            results = run_all(cfg, tmp)
    if args.json:
        print(json.dumps(results))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Continual pretraining {cfg.old_domain} -> {cfg.new_domain}: "
                    f"{cfg.pretrain_steps} + {cfg.continue_steps} steps, batch {cfg.batch}")
    for col in ("remedy", f"{cfg.old_domain} loss before", f"{cfg.old_domain} increase",
                f"{cfg.new_domain} loss before", f"{cfg.new_domain} loss reached",
                "peak LR", "seconds"):
        t.add_column(col, justify="right")
    for r in REMEDIES:
        row = results[r]
        t.add_row(r, f"{row['old_domain_loss_before']:.4f}",
                  f"{row['old_domain_loss_increase']:+.4f}",
                  f"{row['new_domain_loss_before']:.4f}", f"{row['new_domain_loss']:.4f}",
                  f"{row['peak_lr']:.2g}", f"{row['seconds']:.1f}")
    Console().print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
