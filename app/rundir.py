"""Read a run directory written by `meshplan run` (metrics.jsonl, events.jsonl, summary.json,
plan.yaml) with pandas; a torn last line (a crash mid-write) is skipped, not fatal."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from costmodels.errors import MeshplanError
from planner.run_records import read_records


@dataclass
class RunData:
    path: Path
    metrics: pd.DataFrame
    events: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped_steps(self) -> list[int]:
        if "skipped" not in self.metrics:
            return []
        return [int(s) for s in self.metrics.loc[self.metrics["skipped"].fillna(False)
                                                 .astype(bool), "step"]]

    @property
    def rollbacks(self) -> list[tuple[int, int]]:
        """(to_step, from_step) of every rollback event."""
        if self.events.empty or "event" not in self.events:
            return []
        rb = self.events[self.events["event"] == "rollback"]
        return [(int(r["to_step"]), int(r["from_step"])) for _, r in rb.iterrows()]

    @property
    def eval_columns(self) -> list[str]:
        cols = [c for c in self.metrics.columns if c.startswith("eval_loss")]
        return sorted(cols, key=lambda c: (c != "eval_loss", c))

    def predicted_vs_measured(self) -> pd.DataFrame:
        """Step time (s) and peak memory (GB): the plan's prediction against the run."""
        pred = self.summary.get("predicted") or self.plan.get("predicted") or {}
        rows = []
        measured_t = self.summary.get("mean_step_time_s")
        if measured_t is None and "step_time_s" in self.metrics and len(self.metrics):
            good = self.metrics[~self.metrics.get("skipped", pd.Series(False)).fillna(False)
                                .astype(bool)] if "skipped" in self.metrics else self.metrics
            times = good["step_time_s"].iloc[1:] if len(good) > 1 else good["step_time_s"]
            measured_t = float(times.mean())
        if pred.get("step_time_s") is not None or measured_t is not None:
            rows.append({"quantity": "step time (s)", "predicted": pred.get("step_time_s"),
                         "measured": measured_t})
        mem_b = self.summary.get("peak_memory_bytes")
        if pred.get("peak_memory_gb") is not None or mem_b:
            rows.append({"quantity": "peak memory (GB)", "predicted": pred.get("peak_memory_gb"),
                         "measured": (float(mem_b) / 1e9) if mem_b else None})
        return pd.DataFrame(rows, columns=["quantity", "predicted", "measured"])


def _mapping(path: Path, parse: Any) -> dict[str, Any]:
    """A run directory's optional JSON / YAML file as a mapping ({} when absent or not one)."""
    if not path.is_file():
        return {}
    loaded = parse(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def read_run(path: str | Path) -> RunData:
    p = Path(str(path).strip()).expanduser()
    if not str(path).strip():
        raise MeshplanError("run directory: enter the path of a `meshplan run` output directory")
    if not p.is_dir():
        raise MeshplanError(f"run directory {p}: not found; pass the RUN_DIR of `meshplan run`")
    metrics = pd.DataFrame(read_records(p / "metrics.jsonl"))
    if metrics.empty or "step" not in metrics:
        raise MeshplanError(f"run directory {p}: no metrics.jsonl with steps yet; "
                            "is it a `meshplan run` output directory?")
    metrics = metrics.sort_values("step").drop_duplicates("step", keep="last")
    try:
        summary = _mapping(p / "summary.json", json.loads)
    except json.JSONDecodeError:
        raise MeshplanError(f"{p / 'summary.json'}: not valid JSON; delete it to re-read the run") from None
    try:
        plan = _mapping(p / "plan.yaml", yaml.safe_load)
    except yaml.YAMLError:
        plan = {}
    return RunData(p, metrics.reset_index(drop=True), pd.DataFrame(read_records(p / "events.jsonl")),
                   summary, plan)


def find_runs(root: str | Path, limit: int = 200) -> list[Path]:
    """Directories under `root` (two levels) that hold a metrics.jsonl, newest first."""
    r = Path(root).expanduser()
    if not r.is_dir():
        return []
    found = {m.parent for pattern in ("metrics.jsonl", "*/metrics.jsonl", "*/*/metrics.jsonl")
             for m in r.glob(pattern)}
    return sorted(found, key=lambda d: (d / "metrics.jsonl").stat().st_mtime, reverse=True)[:limit]
