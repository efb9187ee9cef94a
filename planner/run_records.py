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
    """The objects of a metrics.jsonl / events.jsonl, the one reader of the tree: [] if the
    file is missing; a torn LAST line (a crash mid-write) is skipped; an unreadable line
    before it means the file is corrupt (one-line error naming the line)."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln]
    out = []
    for k, (i, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if k == len(numbered) - 1:
                break  # torn last line
            raise MeshplanError(f"{p}: line {i} is not JSON (corrupt log); remove that line") from None
        if isinstance(rec, dict):
            out.append({key: _load_float(v) for key, v in rec.items()})
    return out
