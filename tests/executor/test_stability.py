"""Stability policy: planted spikes and NaNs are skipped, streaks roll back, the run ends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from costmodels.errors import MeshplanError
from executor.faults import Fault
from executor.stability import SpikeDetector
from planner.cli import main
from planner.plan_sections import StabilitySection
from tests.executor.executor_testlib import make_plan, read_metrics, write_plan


def test_detector_rules() -> None:
    d = SpikeDetector(StabilitySection(spike_factor=3.0, spike_warmup_steps=2, grad_norm_limit=10.0,
                                       max_consecutive_spikes=2))
    assert not d.check(1, 50.0, 100.0).skip  # warm-up: only non-finite values are skipped
    assert d.check(2, float("nan"), 1.0).reason == "nonfinite"
    assert not d.check(3, 4.0, 1.0).skip
    assert d.running_loss is not None
    run = d.running_loss
    assert d.check(4, 3.0 * run + 1.0, 1.0).reason == "loss_spike"
    dec = d.check(5, 1.0, 11.0)
    assert dec.reason == "grad_norm" and dec.rollback  # second in a row
    assert not d.check(6, 3.9, 1.0).skip and d.consecutive == 0
    state = d.state_dict()
    e = SpikeDetector()
    e.load_state_dict(state)
    assert e.running_loss == d.running_loss


def test_running_loss_is_bias_corrected() -> None:
    d = SpikeDetector(StabilitySection(ema_beta=0.9, spike_warmup_steps=0))
    d.check(1, 5.0, 1.0)
    assert d.running_loss == pytest.approx(5.0)
    d.check(2, 5.0, 1.0)
    assert d.running_loss == pytest.approx(5.0)


def test_fault_parse() -> None:
    assert Fault.parse("spike@25") == Fault("spike", 25)
    with pytest.raises(MeshplanError, match="--inject-fault"):
        Fault.parse("boom@3")


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def test_spike_nan_and_rollback_run_finishes(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, make_plan(checkpoint={"every": 10},
                                          stability={"max_consecutive_spikes": 3}))
    run = tmp_path / "run"
    args = ["run", str(plan), "--out", str(run), "--no-progress",
            "--inject-fault", "nan@8", "--inject-fault", "spike@14"]
    args += [f"--inject-fault=spike@{s}" for s in (25, 26, 27)]
    assert main(args) == 0
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics] == list(range(1, 41))  # each step once
    by_step = {r["step"]: r for r in metrics}
    assert by_step[8]["skipped"] and by_step[8]["skip_reason"] == "nonfinite"
    assert by_step[14]["skipped"] and by_step[14]["skip_reason"] == "loss_spike"
    events = _events(run)
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["from_step"] == 27 and rollbacks[0]["to_step"] == 20
    poisoned = set(rollbacks[0]["blacklisted"])
    assert len(poisoned) == 3 * 4
    # The replay never serves the poisoned samples again, and does not spike.
    replayed = {s for r in metrics if r["step"] > 20 for s in r["sample_ids"]}
    assert not poisoned & replayed
    assert not any(by_step[s]["skipped"] for s in range(21, 41))
    skips = [e for e in events if e["event"] == "skip"]
    assert [e["step"] for e in skips] == [8, 14, 25, 26, 27]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["rollbacks"] == 1
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < summary["first_loss"]


def test_skipped_step_leaves_weights_untouched(tmp_path: Path) -> None:
    """A NaN step is skipped without an update: the following losses equal a clean run's
    whose batch at that step was skipped too (same data cursor, same parameters)."""
    plan = write_plan(tmp_path, make_plan(checkpoint={"every": 0}))
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["run", str(plan), "--no-progress", "--override", "train.max_steps=8"]
    assert main([*base, "--out", str(a), "--inject-fault", "nan@5"]) == 0
    assert main([*base, "--out", str(b), "--inject-fault", "spike@5",
                 "--override", "stability.spike_warmup_steps=2"]) == 0
    ma, mb = read_metrics(a), read_metrics(b)
    assert ma[4]["skipped"] and mb[4]["skipped"]
    assert [r["loss"] for r in ma[5:]] == [r["loss"] for r in mb[5:]]


def test_fault_injector_poisons_samples_not_steps() -> None:
    import torch

    from executor.data.batch import Batch
    from executor.faults import SPIKE_SCALE, FaultInjector

    def batch(ids: list[int]) -> Batch:
        n = len(ids)
        z = torch.zeros(n, 8, dtype=torch.long)
        return Batch(z + 7, z + 7, z, z, torch.tensor(ids))

    inj = FaultInjector([Fault("spike", 3), Fault("garbage", 4), Fault("nan", 5)],
                        vocab_size=50)
    assert inj.apply(3, batch([0, 1]))[0].loss_weight == SPIKE_SCALE
    assert inj.apply(3, batch([0, 1]))[0].loss_weight == SPIKE_SCALE  # replayed: still bad
    assert inj.apply(3, batch([2, 3]))[0].loss_weight == 1.0  # other samples are clean
    g, notes = inj.apply(4, batch([4, 5]))
    assert notes == ["garbage"] and not torch.equal(g.input_ids, batch([4, 5]).input_ids)
    assert math.isnan(inj.apply(5, batch([6]))[0].loss_weight)
    assert inj.apply(5, batch([6]))[0].loss_weight == 1.0  # a NaN fires once
