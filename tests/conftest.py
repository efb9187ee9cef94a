"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never read or write the developer's machine profile (`meshplan bench` records one):
# every process they start sees this path, which does not exist unless a test writes it.
os.environ["MESHPLAN_MACHINE_PROFILE"] = str(
    Path(tempfile.gettempdir()) / f"meshplan-tests-{os.getpid()}" / "machine.yaml")
SHARED_DATA = ROOT.parent / "shared" / "data"
PUBLISHED_RUNS = SHARED_DATA / "published_runs.csv"


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `meshplan ARGS` in a subprocess (as a user would) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=cwd or ROOT,
    )


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`meshplan ARGS` through `planner.cli.main` in this process (no interpreter start-up):
    the same exit status and stdout / stderr as `run_cli`, for tests that call it often."""
    import contextlib
    import io

    from planner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["meshplan", *args], code, out.getvalue(), err.getvalue())


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: exit 2, one line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="session")
def published_runs() -> Path:
    if not PUBLISHED_RUNS.exists():
        pytest.skip("shared/data/published_runs.csv not present")
    return PUBLISHED_RUNS
