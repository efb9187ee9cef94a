"""Forgetting experiment: pretrain a tiny model on domain A, continue on domain B under
each remedy on the same budget, and measure domain A's held-out loss increase and domain
B's held-out loss reached (`benchmarks/continual.py` and `tests/continual` run it).

Remedies (the continual-pretraining recipe of Ibrahim et al. 2024, plus EWC):
  no_remedy      B only, the original peak LR (re-warmed)
  replay         15% of the rows replayed from A's mixture
  low_lr         peak LR x lr_fraction (1/10-1/3 of the original)
  ewc            elastic weight consolidation (Kirkpatrick et al. 2017, eq. 3)
  replay_low_lr  replay and the lower LR together
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from costmodels.presets import PRESETS
from executor.train import RunOptions, run_training
from planner.planfile import Plan, plan_from_dict

REMEDIES: tuple[str, ...] = ("no_remedy", "replay", "low_lr", "ewc", "replay_low_lr")

# Two layers, hidden 64: a few milliseconds a step on one CPU core; vocab of the corpus BPE.
BENCH_MODEL = PRESETS["tiny"].with_(name="forgetting-micro", layers=2, hidden=64,
                                    ffn_hidden=176, heads=4, kv_heads=2, seq_len=64)


@dataclass
class ForgettingConfig:
    old_domain: str = "english"
    new_domain: str = "code"
    pretrain_steps: int = 600
    continue_steps: int = 300
    batch: int = 8
    lr: float = 3e-3
    warmup_steps: int = 10
    replay_fraction: float = 0.15
    lr_fraction: float = 0.2
    ewc_lambda: float = 1e4
    ewc_fisher_batches: int = 8
    eval_batches: int = 4
    heldout_docs: int = 32
    seed: int = 7
    model: dict[str, Any] = field(default_factory=BENCH_MODEL.to_dict)

    def remedy(self, name: str) -> dict[str, Any]:
        """The `continual` section of one remedy (init_from is added by the caller)."""
        table: dict[str, dict[str, Any]] = {
            "no_remedy": {},
            "replay": {"replay_fraction": self.replay_fraction},
            "low_lr": {"lr_fraction": self.lr_fraction},
            "ewc": {"ewc_lambda": self.ewc_lambda,
                    "ewc_fisher_batches": self.ewc_fisher_batches},
            "replay_low_lr": {"replay_fraction": self.replay_fraction,
                              "lr_fraction": self.lr_fraction},
        }
        return table[name]


def _plan(cfg: ForgettingConfig, mixture: dict[str, float], steps: int,
          continual: dict[str, Any] | None = None) -> Plan:
    data: dict[str, Any] = {
        "model": cfg.model,
        "cluster": {"accelerator": "cpu", "num_gpus": 1, "gpus_per_node": 1},
        "layout": {"micro_batch_size": cfg.batch, "global_batch_size": cfg.batch},
        "train": {"max_steps": steps, "precision": "fp32", "lr": cfg.lr, "seed": cfg.seed,
                  "warmup_steps": min(cfg.warmup_steps, steps), "schedule": "cosine",
                  "eval_every": steps, "eval_batches": cfg.eval_batches,
                  "eval_domains": sorted({cfg.old_domain, cfg.new_domain})},
        "data": {"mixture": mixture, "heldout_docs": cfg.heldout_docs},
        "checkpoint": {"every": 0, "keep": 1},
        # Loss spikes are part of the signal here: nothing is skipped.
        "stability": {"spike_warmup_steps": 10**9, "grad_norm_limit": 1e9},
    }
    if continual is not None:
        data["continual"] = continual
    return plan_from_dict(data, "forgetting")


def pretrain(cfg: ForgettingConfig, run_dir: str | Path) -> dict[str, Any]:
    """Domain A only; returns the run summary (resumes / reuses a finished run)."""
    plan = _plan(cfg, {cfg.old_domain: 1.0}, cfg.pretrain_steps)
    return run_training(plan, run_dir, RunOptions(quiet=True, progress=False))


def continue_with(cfg: ForgettingConfig, remedy: str, init_from: str | Path,
                  run_dir: str | Path) -> dict[str, Any]:
    """Continue the pretrained run on domain B under `remedy`; one result row."""
    continual = {"init_from": str(init_from), **cfg.remedy(remedy)}
    if continual.get("replay_fraction"):
        continual["replay_mixture"] = {cfg.old_domain: 1.0}
    plan = _plan(cfg, {cfg.new_domain: 1.0}, cfg.continue_steps, continual)
    t0 = time.perf_counter()
    summary = run_training(plan, run_dir, RunOptions(quiet=True, progress=False))
    seconds = time.perf_counter() - t0
    c = summary["continual"]
    init, final = c["init_eval_losses"], summary["final_eval_losses"]
    a, b = cfg.old_domain, cfg.new_domain
    return {
        "old_domain": a, "new_domain": b,
        "old_domain_loss_before": init[a], "old_domain_loss": final[a],
        "old_domain_loss_increase": final[a] - init[a],
        "new_domain_loss_before": init[b], "new_domain_loss": final[b],
        "new_domain_loss_decrease": init[b] - final[b],
        "steps": summary["steps"], "tokens": summary["tokens"], "peak_lr": c["peak_lr"],
        "replay_fraction": c["replay_fraction"], "lr_fraction": c["lr_fraction"],
        "ewc_lambda": c["ewc_lambda"], "final_train_loss": summary["final_loss"],
        "seconds": seconds,
    }


def run_all(cfg: ForgettingConfig, work_dir: str | Path,
            remedies: tuple[str, ...] = REMEDIES) -> dict[str, dict[str, Any]]:
    """Pretrain once, then every remedy from that same checkpoint on the same budget."""
    work = Path(work_dir)
    pretrain(cfg, work / "pretrain")
    return {r: continue_with(cfg, r, work / "pretrain", work / r) for r in remedies}
