"""Fault injection on the CPU: a SIGKILLed process or rank at a random step, a SIGKILL
inside a checkpoint write, a full disk during a save, a corrupted token shard, and a NaN in
one rank's gradients. After each the run recovers (or stops with one clear line and
recovers once the cause is gone) and:

* no half-written checkpoint is ever trusted (`meshplan checkpoint verify`, resume events);
* every sample id of the stream is consumed exactly once (`sample_ids` in metrics.jsonl:
  the loader's epoch is its id stream 0, 1, 2, ..., each row drawn from (seed, id) alone);
* the final loss matches the unfaulted run (exactly, up to float noise, when the fault
  only interrupted; within a tolerance when a step's update was skipped).

Every outcome is recorded in FAULT_RESULTS and printed as a table after the run.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from costmodels.presets import PRESETS
from planner.planfile import plan_from_dict, save_plan
from tests.reliability.helpers import (
    FAULT_RESULTS,
    ROOT,
    call_cli,
    final_loss,
    read_events,
    read_metrics,
    sample_accounting,
    worker_pids,
)

SEED = int(os.environ.get("MESHPLAN_FAULT_SEED", "20240"))
STEPS = 20
ROWS = 4
MICRO = PRESETS["tiny"].with_(name="micro", layers=2, hidden=64, ffn_hidden=176, heads=4,
                              kv_heads=2, seq_len=64)
# A skipped update moves the trajectory a little; 5% of the loss bounds it at this size.
SKIP_TOLERANCE = 0.05
EXACT = 1e-5  # relative: an interrupted-and-resumed run replays the same arithmetic


def plan_data(**sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": MICRO.to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": 1},
        "layout": {"micro_batch_size": ROWS, "global_batch_size": ROWS},
        "train": {"max_steps": STEPS, "precision": "fp32", "lr": 1e-3, "seed": 7,
                  "warmup_steps": 0},
        "checkpoint": {"every": 5, "keep": 3},
        "data": {"max_docs_per_domain": 200},
        "stability": {"spike_warmup_steps": 10},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def write_plan(directory: Path, data: dict[str, Any]) -> Path:
    return save_plan(plan_from_dict(data), directory / "plan.yaml")


def run_inproc(plan: Path, run: Path, *extra: str) -> tuple[int, str, str]:
    return call_cli(["run", str(plan), "--out", str(run), "--no-progress", *extra],
                    timeout=400)


def run_killed(phase: str, step: int, plan: Path, run: Path) -> subprocess.CompletedProcess:
    """`meshplan run` in a subprocess that SIGKILLs itself at (phase, step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "tests.reliability.killable_run", phase, str(step), "--",
         "run", str(plan), "--out", str(run), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def assert_one_error_line(rc: int, err: str) -> None:
    """A clean stop of a run: exit 2, no traceback, its last stderr line the one error
    (progress notes such as `resumed from ...` may come before it)."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert [x for x in lines if "error:" in x] == lines[-1:], err
    assert lines[-1].startswith("meshplan: error:"), err


def check_run(run: Path, reference: list[dict[str, Any]], fault: str, outcome: str,
              rows: int = ROWS, tolerance: float = EXACT, times: int = 1) -> None:
    """The invariants after a fault, recorded for the summary table."""
    recs = read_metrics(run)
    steps = [r["step"] for r in recs]
    lost, dup = sample_accounting(recs, rows)
    diff = abs(final_loss(recs) - final_loss(reference))
    FAULT_RESULTS.append({"fault": fault, "times": times, "outcome": outcome, "lost": lost,
                          "duplicated": dup, "loss_diff": diff})
    assert steps == list(range(1, len(reference) + 1)), steps  # every step once
    assert (lost, dup) == (0, 0), (lost, dup)
    assert diff <= tolerance * abs(final_loss(reference)), (diff, final_loss(reference))
    leftovers = list((run / "checkpoints").glob(".tmp-*")) if (run / "checkpoints").is_dir() \
        else []
    assert not leftovers, leftovers
    rc, out, err = call_cli(["checkpoint", "verify", str(run)])
    assert rc == 0 and "FAILED" not in out, out + err


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def single_plan(tmp_path_factory, corpus) -> Path:
    return write_plan(tmp_path_factory.mktemp("plan1"), plan_data())


@pytest.fixture(scope="module")
def single_ref(tmp_path_factory, single_plan) -> list[dict[str, Any]]:
    """The unfaulted single-process run (20 steps)."""
    run = tmp_path_factory.mktemp("ref1") / "run"
    rc, _, err = run_inproc(single_plan, run)
    assert rc == 0, err
    recs = read_metrics(run)
    assert sample_accounting(recs, ROWS) == (0, 0)
    return recs


# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_single_process_at_random_step(tmp_path, single_plan, single_ref) -> None:
    rng = random.Random(SEED)
    step = rng.choice([s for s in range(6, STEPS) if s % 5])  # between two checkpoints
    run = tmp_path / "run"
    proc = run_killed("step", step, single_plan, run)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(read_metrics(run)) == step  # it died right after logging `step`
    rc, _, err = run_inproc(single_plan, run)
    assert rc == 0, err
    resume = [e for e in read_events(run) if e["event"] == "resume"]
    assert resume and resume[-1]["step"] == step - step % 5
    check_run(run, single_ref, f"SIGKILL, 1 process, random step ({step})", "recovered")


@pytest.mark.parametrize("phase", ["tensors", "manifest", "rename", "renamed"])
def test_sigkill_during_checkpoint_write(tmp_path, single_plan, single_ref, phase) -> None:
    run = tmp_path / "run"
    proc = run_killed(phase, 10, single_plan, run)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ck = run / "checkpoints"
    complete = phase == "renamed"  # killed after the rename: a whole checkpoint
    if not complete:
        assert (ck / ".tmp-step_000010").is_dir()  # the half-written folder is there ...
        assert not (ck / "step_000010").exists()  # ... under no trusted name
    rc, out, err = call_cli(["checkpoint", "verify", str(run)])
    assert rc == 0, out + err
    assert ("step_000010" in out) == complete, out
    rc, _, err = run_inproc(single_plan, run)
    assert rc == 0, err
    resume = [e for e in read_events(run) if e["event"] == "resume"][-1]
    assert resume["step"] == (10 if complete else 5)
    check_run(run, single_ref, f"SIGKILL inside checkpoint write ({phase})", "recovered")


# --------------------------------------------------------------------------- disk full


def _fill(directory: Path, leave_bytes: int) -> Path:
    filler = directory / "filler.bin"
    free = shutil.disk_usage(directory).free
    chunk = b"\0" * (1 << 20)
    with filler.open("wb") as fh:
        todo = max(0, free - leave_bytes)
        while todo > 0:
            n = fh.write(chunk[: min(len(chunk), todo)])
            todo -= n
    return filler


def _disk_full_then_recover(run: Path, plan: Path, ref: list[dict[str, Any]],
                            label: str, make_full, make_free) -> None:
    rc, _, err = run_inproc(plan, run, "--stop-after-steps", "5")
    assert rc == 0, err
    make_full()
    rc, _, err = run_inproc(plan, run)  # the save at step 10 hits the full disk
    assert_one_error_line(rc, err)
    assert "checkpoint step 10 could not be written" in err, err
    assert "free disk space" in err and "checkpoint step 5 is intact" in err, err
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000005"]  # no partial folder
    make_free()
    rc, _, err = run_inproc(plan, run)
    assert rc == 0, err
    assert [e for e in read_events(run) if e["event"] == "resume"][-1]["step"] == 5
    check_run(run, ref, label, "clean stop, then recovered")


def test_disk_full_during_save_tmpfs(tmp_path, single_plan, single_ref) -> None:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}); the patched "
                    "ENOSPC test covers the same path")
    try:
        state: dict[str, Path] = {}

        def full() -> None:
            state["filler"] = _fill(mnt, leave_bytes=4 << 20)  # a checkpoint needs ~14 MB

        def free() -> None:
            state["filler"].unlink()

        _disk_full_then_recover(mnt / "run", single_plan, single_ref,
                                "disk full during save (80 MB tmpfs)", full, free)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_save_enospc(tmp_path, single_plan, single_ref, monkeypatch) -> None:
    import executor.strategy as strategy

    real = strategy.write_single_process
    state = {"full": False}

    def write(directory: Path, *a: Any) -> None:
        if state["full"]:
            (Path(directory) / "model.pt").write_bytes(b"\0" * 4096)  # a partial file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(directory, *a)

    monkeypatch.setattr(strategy, "write_single_process", write)
    _disk_full_then_recover(tmp_path / "run", single_plan, single_ref,
                            "disk full during save (ENOSPC from the write)",
                            lambda: state.update(full=True), lambda: state.update(full=False))


# --------------------------------------------------------------------------- corrupt data


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0x5A
    elif how == "truncate":
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, how", [("code.bin", "flip"), ("english.bin", "truncate"),
                                       ("code.idx.npy", "flip")])
def test_corrupt_shard_of_a_prepared_dataset(tmp_path, corpus, single_ref, name, how) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(corpus, dataset)
    plan = write_plan(tmp_path, plan_data(data={"dataset_dir": str(dataset)}))
    run = tmp_path / "run"
    rc, _, err = run_inproc(plan, run, "--stop-after-steps", "5")
    assert rc == 0, err
    _damage(dataset / name, how)
    rc, _, err = run_inproc(plan, run)  # a user's dataset: stop with one line, train nothing
    assert_one_error_line(rc, err)
    assert name in err and "sha256" in err and "meshplan data prepare" in err, err
    assert max(r["step"] for r in read_metrics(run)) == 5
    shutil.copy2(corpus / name, dataset / name)  # the user restores (re-prepares) the file
    rc, _, err = run_inproc(plan, run)
    assert rc == 0, err
    check_run(run, single_ref, f"corrupt dataset shard ({name}, {how})",
              "clean stop, then recovered")


def test_corrupt_cached_corpus_is_rebuilt(tmp_path, corpus, single_plan, single_ref,
                                          monkeypatch) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(corpus, cache / "corpus" / corpus.name)
    monkeypatch.setenv("MESHPLAN_CACHE_DIR", str(cache))
    run = tmp_path / "run"
    rc, _, err = run_inproc(single_plan, run, "--stop-after-steps", "5")
    assert rc == 0, err
    _damage(cache / "corpus" / corpus.name / "code.bin", "flip")
    rc, _, err = run_inproc(single_plan, run)  # our own cache: rebuilt, then resumed
    assert rc == 0, err
    assert "cached corpus" in err and "rebuilding" in err, err
    check_run(run, single_ref, "corrupt cached corpus shard (code.bin)", "recovered (rebuilt)")


# --------------------------------------------------------------------------- two ranks

DIST_STEPS = 12
DIST_ROWS = 8


def dist_plan_data(**sections: dict[str, Any]) -> dict[str, Any]:
    data = plan_data(
        cluster={"num_gpus": 2},
        layout={"dp": 2, "sharding": "none", "micro_batch_size": 2,
                "global_batch_size": DIST_ROWS},
        train={"max_steps": DIST_STEPS},
        checkpoint={"every": 4},
    )
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


@pytest.fixture(scope="module")
def dist_ref(tmp_path_factory, corpus) -> list[dict[str, Any]]:
    """The unfaulted run of the two-rank plan, in one process (same global batch)."""
    tmp = tmp_path_factory.mktemp("ref2")
    plan = write_plan(tmp, dist_plan_data())
    rc, _, err = run_inproc(plan, tmp / "run", "--override", "layout.dp=1", "--override",
                            "cluster.num_gpus=1")
    assert rc == 0, err
    return read_metrics(tmp / "run")


@pytest.mark.timeout(300)
def test_nan_in_one_ranks_gradients_skips_on_every_rank(tmp_path, dist_ref) -> None:
    from tests.parallel.distutil import run_distributed
    from tests.reliability.dist_workers import train_with_fault

    nan_step = random.Random(SEED + 1).randint(3, DIST_STEPS - 1)
    run = tmp_path / "run"
    results = run_distributed(train_with_fault, 2, dist_plan_data(), str(run),
                              [f"nan@{nan_step}:1"], timeout=240)
    by_rank = {r["rank"]: r for r in results}
    for rank in (0, 1):
        skipped = [(s["step"], s["reason"]) for s in by_rank[rank]["steps"] if s["skipped"]]
        assert skipped == [(nan_step, "nonfinite")], (rank, skipped)
    planted = [s["step"] for s in by_rank[1]["steps"] if "nan" in s["faults"]]
    assert planted == [nan_step] and not any(s["faults"] for s in by_rank[0]["steps"])
    # Both ranks skipped the same update: the replicas are still bit-identical.
    assert by_rank[0]["checksum"] == by_rank[1]["checksum"]
    assert all(map(lambda v: v == v, by_rank[0]["checksum"].values()))  # not NaN
    recs = read_metrics(run)
    assert [r["step"] for r in recs if r["skipped"]] == [nan_step]
    check_run(run, dist_ref, f"NaN in rank 1's gradients (step {nan_step}, 2 ranks gloo)",
              "recovered (step skipped on both ranks)", rows=DIST_ROWS,
              tolerance=SKIP_TOLERANCE)


@pytest.mark.timeout(400)
def test_sigkill_a_rank_under_torchrun_at_random_step(tmp_path, dist_ref) -> None:
    rng = random.Random(SEED + 2)
    kill_after = rng.randint(3, DIST_STEPS - 2)
    plan = write_plan(tmp_path, dist_plan_data())
    run = tmp_path / "run"
    env = {**os.environ, "MESHPLAN_MAX_RESTARTS": "1", "MESHPLAN_LAUNCH_TIMEOUT_S": "300",
           "MESHPLAN_DIST_TIMEOUT_S": "45", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "run", str(plan), "--out", str(run),
         "--no-progress"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and killed is None and proc.poll() is None:
            m = run / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= kill_after:
                pids = sorted(worker_pids(run))
                if len(pids) == 2:
                    killed = rng.choice(pids)
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        assert killed is not None, "the run never reached the kill step"
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
    resumes = [e for e in read_events(run) if e["event"] == "resume"]
    assert resumes, "the restarted workers did not resume from a checkpoint"
    check_run(run, dist_ref, f"SIGKILL one of 2 torchrun ranks after step {kill_after}",
              "recovered (torchrun restart)", rows=DIST_ROWS, tolerance=1e-4)
