"""Reliability suite: single-threaded torch; the fault table and the bad-input case count
in the terminal summary (and as JSON at $MESHPLAN_RELIABILITY_JSON when set)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.reliability.helpers import CASE_COUNTS, FAULT_RESULTS, PARTIAL_FILES, TRACEBACKS


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus() -> Path:
    """The embedded corpus (200 docs per domain), prepared once and cached."""
    from executor.data.prepare import prepare_default_corpus

    return prepare_default_corpus(8192, 200, progress=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    w = terminalreporter.write_line
    if FAULT_RESULTS:
        w("")
        w(f"{'fault injected':<62} {'times':>5}  {'outcome':<38} {'lost':>4} {'dup':>4} "
          f"{'|loss diff|':>11}")
        for r in FAULT_RESULTS:
            w(f"{r['fault'][:62]:<62} {r['times']:>5}  {r['outcome'][:38]:<38} {r['lost']:>4} "
              f"{r['duplicated']:>4} {r['loss_diff']:>11.3g}")
    if CASE_COUNTS:
        total = sum(CASE_COUNTS.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(CASE_COUNTS.items()))
        w(f"bad-input cases generated: {total} ({parts})")
    path = os.environ.get("MESHPLAN_RELIABILITY_JSON")
    if path and (FAULT_RESULTS or CASE_COUNTS):
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"faults": FAULT_RESULTS, "bad_input_cases": dict(CASE_COUNTS),
                       "tracebacks": TRACEBACKS, "partial_files": PARTIAL_FILES,
                       "exitstatus": int(exitstatus)}, fh, indent=1)
