"""How much work the slowest tests do. `quick` (the default) keeps `make test` inside its
20-minute budget on 2 cores; `full` (`MESHPLAN_TEST_SCALE=full`, `make test-full`) runs the
sizes the issues name: 200 drawn layouts, 20 steps on 8 ranks, the whole calibration loop."""

from __future__ import annotations

import os

FULL = os.environ.get("MESHPLAN_TEST_SCALE", "quick") == "full"


def scaled(quick: int, full: int) -> int:
    """`full` under `MESHPLAN_TEST_SCALE=full`, else `quick`."""
    return full if FULL else quick
