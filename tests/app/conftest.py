"""Fixtures for the dashboard tests: AppTest factories and a small `meshplan run` directory."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the dashboard extra (streamlit) is not installed")
pytest.importorskip("plotly", reason="the dashboard extra (plotly) is not installed")

from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "app"
TIMEOUT = 120  # seconds per script run: the default search is llama3-70b on 1,024 GPUs


@pytest.fixture(autouse=True)
def _restore_main_module():
    """AppTest leaves `sys.modules["__main__"]` set to the last script it ran; every process
    multiprocessing starts afterwards (the gloo ranks of tests/parallel) would re-run that
    page as its main module (~3 s of imports a rank). Put the real one back."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture
def page() -> Callable[[str], AppTest]:
    """page("plan") -> an AppTest of app/views/plan.py, already run once."""

    def make(name: str, run: bool = True) -> AppTest:
        path = APP / "main.py" if name == "main" else APP / "views" / f"{name}.py"
        at = AppTest.from_file(str(path), default_timeout=TIMEOUT)
        return at.run() if run else at

    return make


def write_run_dir(root: Path, steps: int = 30, skipped: tuple[int, ...] = (12, 13),
                  rollback: tuple[int, int] | None = (10, 14), domains: bool = True) -> Path:
    """A run directory as `meshplan run` writes it (metrics / events / summary / plan)."""
    run = root / "run1"
    run.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {
            "step": s, "loss": 9.0 - 0.1 * s + (3.0 if s in skipped else 0.0),
            "lr": 3e-4 * min(1.0, s / 5), "grad_norm": 1.0 + 0.01 * s,
            "tokens": 4096 * s, "step_time_s": 0.5, "tokens_per_sec": 8192.0,
            "skipped": s in skipped, "skip_reason": "loss spike" if s in skipped else None,
        }
        if domains and s % 10 == 0:
            rec.update(eval_loss=8.0 - 0.1 * s, eval_loss_code=7.5 - 0.1 * s,
                       eval_loss_english=8.5 - 0.1 * s)
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 31, \"lo")  # torn
    events = [{"event": "start", "step": 0}]
    events += [{"event": "skip", "step": s, "reason": "loss spike"} for s in skipped]
    if rollback:
        events.append({"event": "rollback", "from_step": rollback[1], "to_step": rollback[0],
                       "path": "ckpt", "blacklisted": [1, 2]})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "summary.json").write_text(json.dumps({
        "steps": steps, "mean_step_time_s": 0.5, "peak_memory_bytes": 2.0e9,
        "tokens_per_sec": 8192.0,
        "predicted": {"step_time_s": 0.4, "peak_memory_gb": 1.6},
    }))
    (run / "plan.yaml").write_text("model: {}\n")
    return run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run_dir(tmp_path)
