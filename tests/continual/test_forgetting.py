"""Forgetting, measured: english -> code with a fixed seed; every remedy must forget less
than no remedy on the same budget (the benchmark's experiment, shortened)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from executor.forgetting import REMEDIES, ForgettingConfig, run_all

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    cfg = ForgettingConfig(pretrain_steps=120, continue_steps=60, eval_batches=2, seed=7)
    return run_all(cfg, tmp_path_factory.mktemp("forgetting"))


def test_remedies_reduce_forgetting(results: dict[str, dict]) -> None:
    assert list(results) == list(REMEDIES)
    base = results["no_remedy"]
    for r in REMEDIES:
        row = results[r]
        assert row["steps"] == 60 and row["tokens"] == base["tokens"]  # the same budget
        assert row["old_domain_loss_before"] == base["old_domain_loss_before"]  # one source
        # Everyone learns the new domain...
        assert row["new_domain_loss"] < row["new_domain_loss_before"] - 0.5, r
    # ...no remedy forgets the old one clearly...
    assert base["old_domain_loss_increase"] > 0.2
    # ...and each remedy forgets measurably less (at most 80% of the no-remedy increase).
    for r in REMEDIES[1:]:
        assert results[r]["old_domain_loss_increase"] < 0.8 * base["old_domain_loss_increase"], r
    # Replay keeps most of the old domain; combining it with a lower LR keeps it best.
    assert results["replay"]["old_domain_loss_increase"] < 0.5 * base["old_domain_loss_increase"]
    assert results["replay_low_lr"]["old_domain_loss_increase"] < results["low_lr"][
        "old_domain_loss_increase"]
    # The price: the lower LR reaches a higher new-domain loss than no remedy.
    assert results["low_lr"]["new_domain_loss"] > base["new_domain_loss"]


def test_benchmark_json_contract(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "continual.py"), "--json",
         "--pretrain-steps", "12", "--continue-steps", "4", "--eval-batches", "1",
         "--ewc-fisher-batches", "1", "--out", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert set(res) == set(REMEDIES)
    for row in res.values():
        assert isinstance(row["old_domain_loss_increase"], float)
        assert isinstance(row["new_domain_loss"], float)
