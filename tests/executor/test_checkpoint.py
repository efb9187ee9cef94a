"""Checkpoints: atomic, verified by manifest, pruned, mirrored, resumed automatically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from executor.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
    verify_checkpoint,
)
from planner.cli import main
from tests.executor.executor_testlib import make_plan, read_metrics, write_plan


def _run(tmp_path: Path, steps: int, *extra: str, **sections: dict) -> tuple[Path, list[str]]:
    plan = write_plan(tmp_path, make_plan(**sections))
    run = tmp_path / "run"
    base = ["run", str(plan), "--out", str(run), "--no-progress",
            "--override", f"train.max_steps={steps}", *extra]
    return run, base


def test_rng_state_roundtrip() -> None:
    import random

    import numpy as np

    state = json.loads(json.dumps(capture_rng_state()))  # must survive plain JSON
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "no_manifest"])
def test_damaged_newest_checkpoint_falls_back_with_warning(tmp_path: Path, damage: str,
                                                           capsys) -> None:
    run, base = _run(tmp_path, 40, checkpoint={"every": 10, "keep": 3})
    assert main([*base, "--stop-after-steps", "30"]) == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000010", "step_000020", "step_000030"]
    newest = run / "checkpoints" / "step_000030"
    model = newest / "model.pt"
    if damage == "corrupt":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "truncate":
        model.write_bytes(model.read_bytes()[:1000])
    else:
        (newest / "manifest.json").unlink()
    with pytest.raises(CheckpointError):
        verify_checkpoint(newest)
    assert main(["checkpoint", "verify", str(run)]) == 1
    capsys.readouterr()
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "step_000030" in err
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert resume["step"] == 20
    assert any(e["event"] == "warning" and "step_000030" in e["message"] for e in events)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 41))


def test_resume_from_fallback_is_still_exact(tmp_path: Path) -> None:
    run, base = _run(tmp_path, 30, checkpoint={"every": 10, "keep": 3})
    assert main(base) == 0
    reference = [r["loss"] for r in read_metrics(run)]
    model = run / "checkpoints" / "step_000030" / "optim.pt"
    model.write_bytes(model.read_bytes()[:-10])
    shutil.rmtree(run / "checkpoints" / "step_000020")  # fall back two checkpoints
    (run / "summary.json").unlink()
    # Resuming at step 10 replays 11..30 exactly (the final checkpoint is re-written).
    assert main(base) == 0
    assert [r["loss"] for r in read_metrics(run)] == reference
    assert verify_checkpoint(run / "checkpoints" / "step_000030") == 30


def test_keep_last_k_and_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    run, base = _run(tmp_path, 25, checkpoint={"every": 5, "keep": 2,
                                               "mirror_dir": str(mirror)})
    assert main(base) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_000020", "step_000025"]
    assert sorted(p.name for p in mirror.iterdir()) == names
    assert verify_checkpoint(mirror / "step_000025") == 25
    # Lose the run's own checkpoints: the mirror still resumes the run.
    shutil.rmtree(run / "checkpoints")
    assert main([*base[:-1], "train.max_steps=30"]) == 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 31))


def test_stale_temporary_folder_is_ignored(tmp_path: Path) -> None:
    run, base = _run(tmp_path, 12, checkpoint={"every": 5})
    assert main([*base, "--stop-after-steps", "10"]) == 0
    junk = run / "checkpoints" / ".tmp-step_000011"
    junk.mkdir()
    (junk / "model.pt").write_bytes(b"half written")
    assert main(base) == 0
    assert [r["step"] for r in read_metrics(run)][-1] == 12


def test_all_checkpoints_corrupt_is_a_user_error(tmp_path: Path, capsys) -> None:
    run, base = _run(tmp_path, 10, checkpoint={"every": 5})
    assert main([*base, "--stop-after-steps", "10"]) == 0
    for p in (run / "checkpoints").iterdir():
        (p / "state.json").write_text("{}")
    assert main(base) == 2
    assert "no intact checkpoint" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused(tmp_path: Path, capsys) -> None:
    run, base = _run(tmp_path, 10, checkpoint={"every": 5})
    assert main([*base, "--stop-after-steps", "5"]) == 0
    assert main([*base, "--override", "train.seed=99"]) == 2
    assert "different seed" in capsys.readouterr().err


def test_manager_save_is_atomic_under_failure(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ck", keep=2)

    def failing(d: Path) -> None:
        (d / "model.pt").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mgr.save(3, failing)
    assert mgr.latest_valid() is None
    assert not (tmp_path / "ck" / "step_000003").exists()
    mgr.save(4, lambda d: (d / "model.pt").write_bytes(b"ok"))
    assert mgr.latest_valid() == tmp_path / "ck" / "step_000004"
