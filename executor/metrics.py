"""Run outputs: `metrics.jsonl` (one object per optimizer step), `events.jsonl` (every
stability / checkpoint decision) and the terminal progress display."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from planner.run_records import read_records


def _clean(x: Any) -> Any:
    """JSON has no NaN/Infinity: write them as strings so every line stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


class JsonlLog:
    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")

    def read_all(self) -> list[dict[str, Any]]:
        return read_records(self.path)


class EventLog(JsonlLog):
    def write(self, record: dict[str, Any]) -> None:
        super().write({"time": time.time(), **record})


class MetricsLog(JsonlLog):
    def truncate_after(self, step: int) -> None:
        """Keep only records of steps <= `step`, each once (atomic rewrite)."""
        if not self.enabled or not self.path.is_file():
            return
        from planner.atomic import atomic_write_text

        seen: dict[int, dict[str, Any]] = {}
        for rec in self.read_all():
            s = int(rec.get("step", 0))
            if s <= step:
                seen[s] = rec
        atomic_write_text(
            self.path, "".join(json.dumps(_clean(seen[s])) + "\n" for s in sorted(seen))
        )


class _NullProgress:
    def update(self, step: int, rec: dict[str, Any] | None) -> None:
        return None


class _RichProgress:
    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress = progress
        self.task = task

    def update(self, step: int, rec: dict[str, Any] | None) -> None:
        fields: dict[str, Any] = {}
        if rec is not None:
            fields = {
                "loss": f"{rec['loss']:.4f}" if isinstance(rec["loss"], float) else rec["loss"],
                "tps": f"{rec['tokens_per_sec']:.0f}",
                "skip": " skipped" if rec["skipped"] else "",
            }
        self.progress.update(self.task, completed=step, **fields)


class Reporter:
    """Progress bar plus warnings on stderr (rich); silent on non-logging ranks."""

    def __init__(self, enabled: bool = True, show_progress: bool = True) -> None:
        self.enabled = enabled  # warnings and the final table
        self.show_progress = enabled and show_progress
        self.console = Console(stderr=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(Text(message, style="yellow"), soft_wrap=True)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(Text(message), soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, total: int, start: int) -> Iterator[Any]:
        if not self.show_progress:
            yield _NullProgress()
            return
        prog = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("[red]{task.fields[skip]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console,
        )
        with prog:
            task = prog.add_task("train", total=total, completed=start, loss="-", tps="-",
                                 skip="")
            yield _RichProgress(prog, task)

    def final(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        table = Table(title="meshplan run", show_header=False)
        def fmt(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)
        for key in ("steps", "objective", "params", "tokens", "first_loss", "final_loss",
                    "final_eval_loss", "skipped_steps", "rollbacks", "mean_step_time_s",
                    "tokens_per_sec", "peak_memory_bytes"):
            if summary.get(key) is not None:
                table.add_row(key, fmt(summary[key]))
        pred = summary.get("predicted", {}).get("step_time_s")
        if pred is not None:
            table.add_row("predicted_step_time_s", fmt(pred))
        if summary.get("measured_over_predicted_step_time") is not None:
            table.add_row("measured / predicted", fmt(summary["measured_over_predicted_step_time"]))
        self.console.print(table)


def last_logged_step(path: str | Path) -> int | None:
    """The highest step a metrics.jsonl holds (None: no file or no step yet)."""
    steps = [int(r["step"]) for r in JsonlLog(Path(path)).read_all() if "step" in r]
    return max(steps) if steps else None
