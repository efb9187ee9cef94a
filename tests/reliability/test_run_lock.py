"""One writer per run directory (`executor.dir_lock`): two `meshplan run` on one `--out`
started together train once; a lock left by a killed process is taken over with a warning;
`data prepare` and `calibrate --local-loop` refuse a folder another process is writing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor.dir_lock import HELD_ENV, LOCK_NAME, dir_lock, run_dir_lock, sibling_lock
from tests.reliability.helpers import ROOT, assert_clean, call_cli, read_metrics
from tests.reliability.test_faults import plan_data, write_plan

STEPS = 12


def _start(plan: Path, run: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "run", str(plan), "--out", str(run), "--no-progress"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _lock_text(run: Path) -> str:
    try:
        return (run / LOCK_NAME).read_text()
    except OSError:
        return ""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dp", [1, 2])
def test_two_runs_on_one_directory_train_once(tmp_path: Path, dp: int) -> None:
    plan = write_plan(tmp_path, plan_data(train={"max_steps": STEPS}, cluster={"num_gpus": dp},
                                          layout={"dp": dp, "global_batch_size": 4 * dp}))
    run = tmp_path / "run"
    first = _start(plan, run)
    deadline = time.monotonic() + 60  # the second starts once the first holds the lock
    while time.monotonic() < deadline and f'"pid": {first.pid}' not in _lock_text(run):
        time.sleep(0.05)
    t0 = time.monotonic()
    second = _start(plan, run)
    _, err2 = second.communicate(timeout=60)
    waited = time.monotonic() - t0
    _, err1 = first.communicate(timeout=200)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 2 and waited < 5, (second.returncode, waited, err2)
    assert_clean(second.returncode, err2)
    assert f"pid {first.pid}" in err2 and "--out" in err2, err2
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, STEPS + 1))  # each step once
    assert (run / LOCK_NAME).read_text() == ""  # released cleanly


@pytest.mark.timeout(120)
def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from executor.dir_lock import dir_lock; "
         "dir_lock(sys.argv[1], '--out').acquire(); print('held', flush=True); time.sleep(600)",
         str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    left = json.loads((run / LOCK_NAME).read_text())
    assert left["pid"] == holder.pid and left["host"] and left["started"] > 0
    plan = write_plan(tmp_path, plan_data(train={"max_steps": 3}))
    rc, _, err = call_cli(["run", str(plan), "--out", str(run), "--no-progress"], timeout=60)
    assert rc == 2 and f"in use by meshplan pid {holder.pid}" in err, err
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    rc, _, err = call_cli(["run", str(plan), "--out", str(run), "--no-progress"], timeout=90)
    assert rc == 0, err
    assert f"taking over the lock left by pid {holder.pid}" in err and "(gone)" in err, err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_data_prepare_and_local_loop_refuse_a_folder_in_use(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with sibling_lock(data, "--out"):
        rc, _, err = call_cli(["data", "prepare", "--out", str(data), "--max-docs", "5",
                               "--no-progress"])
        assert_clean(rc, err)
        assert rc == 2 and "in use by meshplan pid" in err and not data.exists(), err
    work = tmp_path / "loop"
    with dir_lock(work, "--workdir"):
        rc, _, err = call_cli(["calibrate", "--local-loop", "--workdir", str(work)])
        assert_clean(rc, err)
        assert rc == 2 and "--workdir" in err and "in use" in err, err
        assert sorted(p.name for p in work.iterdir()) == [LOCK_NAME]  # nothing else written
    rc, _, err = call_cli(["calibrate", "--local-loop", "--workdir", str(tmp_path / "l2"),
                           "--loop-runs", "nope"])
    assert rc == 2 and "--loop-runs" in err and not (tmp_path / "l2").exists(), err


def test_only_the_first_writer_of_a_launch_takes_the_lock(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    with dir_lock(run, "--out"):
        # the launcher's ranks (it holds the lock for them) and every rank but global 0
        monkeypatch.setenv(HELD_ENV, str(run))
        with run_dir_lock(run):
            pass
        monkeypatch.delenv(HELD_ENV)
        monkeypatch.setenv("RANK", "3")
        monkeypatch.setenv("LOCAL_RANK", "1")
        with run_dir_lock(run):
            pass
        monkeypatch.delenv("LOCAL_RANK")  # a stray RANK without a launcher locks as usual
        with pytest.raises(Exception, match="in use by meshplan"):
            run_dir_lock(run).__enter__()
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(Exception, match="in use by meshplan"):
            run_dir_lock(run).__enter__()
    (run_file := tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="is not a folder"):
        dir_lock(run_file, "--out").acquire()
