"""Zero-bubble and DualPipe-V schedules train the one-process model: 20 fp32 steps on gloo
whose losses match the single-process executor within 1e-4 relative (bit for bit here: the
whole-tensor gradient clip combines norms as one process does), with the collective payload
`costmodels.comm_volume` predicts (V placements send nothing at their turn)."""

from __future__ import annotations

import pytest
from distutil import run_distributed
from test_layouts import STEPS, _check
from workers import compare_worker

PP2 = [
    {"pp": 2, "schedule": "zbh1"},
    {"pp": 2, "schedule": "interleaved_zb"},
    {"pp": 2, "schedule": "zbv"},
    {"pp": 2, "schedule": "dualpipev"},
]


@pytest.mark.timeout(420)
def test_zero_bubble_and_dualpipev_two_ranks():
    res = run_distributed(compare_worker, 2, PP2, STEPS, "tiny-mha", 4, timeout=400)
    _check(PP2, res[0])
    assert [r["name"] for r in res[0]] == ["pp2-zbh1", "pp2-interleaved_zb", "pp2-zbv", "pp2-dualpipev"]
    for r in res[0]:
        assert r["losses"] == r["reference"], r["name"]  # the clip's exact path


PP4 = [
    {"pp": 4, "schedule": "zbv"},
    {"pp": 4, "schedule": "dualpipev", "micro_batch_size": 1},  # 2 x pp micro-batches
]


@pytest.mark.timeout(420)
def test_v_schedules_four_ranks():
    res = run_distributed(compare_worker, 4, PP4, STEPS, "tiny-mha", 8, timeout=400)
    _check(PP4, res[0])
