"""The plan.yaml of one ranked layout of a search: its model, cluster, layout, a training
schedule sized for the token budget, and what the cost model predicted for it. `meshplan
plan --out` and the dashboard's Plan page both build their plans here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from costmodels.profile import Profile
from costmodels.specs import ClusterSpec, ModelSpec
from planner.planfile import cluster_section, layout_section
from planner.profiles import PricedBy
from planner.schedule_advice import recommend_lr, steps_for_tokens
from planner.search import BREAKDOWN, row_to_layout


@dataclass(frozen=True)
class TrainChoice:
    """What the user chose about training, beyond the layout."""

    steps: int
    objective: str = "clm"
    lr: float | None = None  # None: recommended for the model size (`recommend_lr`)
    schedule: str | None = None  # None: the recommendation's


def steps_for_budget(model: ModelSpec, global_batch: int, train_tokens: float | None) -> int:
    """Optimizer steps for a token budget; without one, ~20 tokens per parameter (Hoffmann
    et al. 2022)."""
    total = train_tokens or 20 * model.param_count()
    return int(steps_for_tokens(total, global_batch * model.seq_len))


def plan_data(model: ModelSpec, cluster: ClusterSpec, row: pd.Series, global_batch: int,
              precision: str, train: TrainChoice, profile: Profile, priced_by: PricedBy,
              framework: str = "meshplan", engine: str = "torch",
              candidates: int = 0) -> dict[str, Any]:
    """The plan (as a dict for `plan_from_dict`) of the search row `row`."""
    lay = row_to_layout(row, global_batch, precision)
    advice = recommend_lr(float(model.param_count()), int(train.steps))
    section = advice.train_overrides()
    # Keep warmup as a share of the run so `--override train.max_steps=N` scales it.
    section.pop("warmup_steps", None)
    section.update(warmup_frac=advice.warmup_frac, objective=train.objective, precision=precision)
    if train.lr:
        section.update(lr=train.lr, min_lr=train.lr / 10)
    if train.schedule:
        section["schedule"] = train.schedule
    step_s = float(row["step_time_s"])
    predicted = {
        "step_time_s": step_s,
        "tokens_per_sec_per_gpu": float(row["tokens_per_sec_per_gpu"]),
        "tokens_per_sec_per_gpu_interval": [float(row["tokens_per_sec_per_gpu_low"]),
                                            float(row["tokens_per_sec_per_gpu_high"])],
        "framework": framework,  # the stack the prediction assumed
        "runnable_by_executor": bool(row["runnable"]),
        "mfu_pct": float(row["mfu_pct"]),
        "peak_memory_gb": float(row["peak_memory_gb"]),
        "breakdown_s": {k.removesuffix("_s"): round(float(row[k]), 6) for k in BREAKDOWN},
        "memory_gb": {k.removeprefix("mem_").removesuffix("_gb"): float(row[k])
                      for k in row.index if k.startswith("mem_")},
        "time_to_train_hours": step_s * train.steps / 3600,
        "candidates_evaluated": int(candidates),
        "profile": profile.source,
        "priced_by": priced_by.to_dict(),
    }
    return {
        "model": model.to_dict(),
        "cluster": cluster_section(cluster),
        "layout": layout_section(lay, engine),
        "train": section,
        "predicted": predicted,
        "profile": profile.to_dict(),
    }
