"""Executor tests run single-threaded: the CI machine has 2 cores shared by everything."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)
