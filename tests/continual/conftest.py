"""Continual-pretraining tests: single-threaded (2 shared CI cores), one pretrained source
run per session shared by every test that continues from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from executor.train import RunOptions, run_training
from tests.executor.executor_testlib import make_plan


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def source_plan(**train: object):
    """A tiny CLM run on `english` only, checkpointed every 10 steps."""
    return make_plan(
        train={"max_steps": 30, "lr": 3e-3, "warmup_steps": 3, "eval_every": 10,
               "eval_batches": 1, **train},
        data={"mixture": {"english": 1.0}, "heldout_docs": 16},
        checkpoint={"every": 10, "keep": 5},
    )


@pytest.fixture(scope="session")
def english_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("english") / "run"
    summary = run_training(source_plan(), run, RunOptions(quiet=True, progress=False))
    assert summary["finished"]
    return run
