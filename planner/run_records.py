"""The one reader of a run's JSON-lines logs (`metrics.jsonl`, `events.jsonl`), for the
executor, the calibration and the dashboard: non-finite numbers come back as floats (the
writer stores them as "nan" / "inf" strings), a torn last line is skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from costmodels.errors import MeshplanError


def _load_float(x: Any) -> Any:
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    return x


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a metrics.jsonl / events.jsonl: [] if the file is missing. A last line
    the writer never finished (no newline after it: a crash mid-write) is skipped; any
    complete line that is not JSON means the file is corrupt (one line naming it)."""
    p = Path(path)
    if not p.is_file():
        return []
    text = p.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    unfinished = lines.pop()  # "" when the file ends with a newline
    out = []
    for i, line in enumerate([*lines, unfinished], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) + 1:
                break  # torn last line
            raise MeshplanError(f"{p}: line {i} is not JSON (corrupt log); remove that line") from None
        if isinstance(rec, dict):
            out.append({key: _load_float(v) for key, v in rec.items()})
    return out
