"""Shared helpers of the reliability suite: in-process CLI calls with a hang guard, the
clean-error contract, tiny plans, metrics readers and the sample-accounting check."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# Generated bad-input cases per suite, printed in the terminal summary (conftest.py).
CASE_COUNTS: Counter[str] = Counter()
# Bad-input cases that ended in a traceback, or left a partial file (test_bad_input.call_cli).
TRACEBACKS: list[str] = []
PARTIAL_FILES: list[str] = []
# One entry per injected fault: fault, times, outcome, lost, duplicated, loss_diff.
FAULT_RESULTS: list[dict[str, Any]] = []


class Hang(Exception):
    """A call ran past its time limit."""


@contextlib.contextmanager
def no_hang(seconds: float) -> Iterator[None]:
    """Fail (raise Hang) when the block runs longer than `seconds` (SIGALRM, main thread)."""

    def _alarm(signum: int, frame: Any) -> None:
        raise Hang(f"call still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def call_cli(argv: list[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """`meshplan ARGV` in this process: (exit code, stdout, stderr). An argparse usage error
    is exit code 2 like the dispatcher's own; any other exception propagates (a bug)."""
    from planner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with no_hang(timeout), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def assert_clean(rc: int, err: str, ok_codes: tuple[int, ...] = (0,), argv: Any = None) -> None:
    """The bad-input contract: success, or exit 2 with exactly one `error:` line on stderr and
    no traceback (argparse's errors too: `meshplan CMD: error: ...`)."""
    assert "Traceback" not in err, (argv, err)
    if rc in ok_codes:
        return
    assert rc == 2, (argv, rc, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "error:" in lines[0], (argv, err)


def run_subprocess(*args: str, timeout: float = 120,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )


# --------------------------------------------------------------------------- runs


def read_metrics(run: Path) -> list[dict[str, Any]]:
    recs = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            recs.append(json.loads(line))
    return recs


def read_events(run: Path) -> list[dict[str, Any]]:
    p = run / "events.jsonl"
    if not p.is_file():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def sample_accounting(records: list[dict[str, Any]], rows: int,
                      blacklist: set[int] = frozenset()) -> tuple[int, int]:
    """(lost, duplicated) sample ids over a run's final metrics.

    The loader's stream is sample id 0, 1, 2, ... (one pass over it is the epoch: row g is
    drawn from (seed, g) alone), so after N steps of R rows exactly the ids 0 .. N*R - 1
    (less any blacklisted ones) must each have been consumed once."""
    ids = [i for r in sorted(records, key=lambda r: r["step"]) for i in r["sample_ids"]]
    counts = Counter(ids)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    steps = max((r["step"] for r in records), default=0)
    expected: list[int] = []
    g = 0
    while len(expected) < steps * rows:
        if g not in blacklist:
            expected.append(g)
        g += 1
    lost = len(set(expected) - set(counts))
    extra = len(set(counts) - set(expected))
    return lost + extra, duplicated


def final_loss(records: list[dict[str, Any]]) -> float:
    good = [r for r in sorted(records, key=lambda r: r["step"]) if not r.get("skipped")]
    return float(good[-1]["loss"])


def worker_pids(run: Path) -> list[int]:
    """The torchrun workers (not the launcher, not torchrun) of `meshplan run ... RUN`."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"planner.cli" in cmd and str(run).encode() in cmd and \
                b"torch.distributed.run" not in cmd and any(e.startswith(b"LOCAL_RANK=")
                                                            for e in env):
            pids.append(int(d.name))
    return pids
