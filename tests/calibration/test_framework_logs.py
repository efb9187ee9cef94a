"""`meshplan calibrate --log`: step times from Megatron / torchtitan / DeepSpeed / NeMo logs.

The logs are written here, in each trainer's own line format, from a "true" machine the
profile does not know (its GEMMs 18 % slower than the shipped profile's and a 40 ms per-step
host overhead), with +-1.5 % step-to-step noise; calibrating on them must recover
predictions within 5 % of every logged step.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from costmodels.cases import single_case
from costmodels.steptime import evaluate
from planner.calibration.framework_logs import parse_log
from planner.planfile import load_plan
from planner.profiles import load_profile
from tests.conftest import assert_clean_error, cli_in_process

STEPS = 30
NOISE = 0.015


def _truth():
    base = load_profile(None, machine=False)
    return base.with_(gemm_eff={**base.gemm_eff, "hopper": base.gemm_eff["hopper"] * 0.82},
                      step_overhead_s=0.04)


def _true_steps(plan, framework: str, seed: int) -> np.ndarray:
    case = single_case(plan.model_spec(), plan.layout_spec(), plan.cluster.spec(), None, framework)
    t = float(evaluate(case, _truth())["step_time_s"][0])
    rng = np.random.default_rng(seed)
    return t * (1 + rng.uniform(-NOISE, NOISE, STEPS))


def megatron_log(plan, times: np.ndarray, peak_mb: float = 61234.5) -> str:
    lay = plan.layout
    lines = [f"using world size: {plan.cluster.num_gpus}, data-parallel size: {lay.dp}"]
    for i, t in enumerate(times, 1):
        lines.append(
            f" [2026-12-01 10:{i // 60:02d}:{i % 60:02d}] iteration {i:8d}/{1000:8d} | consumed samples: "
            f"{i * lay.global_batch_size:12d} | elapsed time per iteration (ms): {t * 1000:.1f} | "
            f"throughput per GPU (TFLOP/s/GPU): 401.2 | learning rate: 3.000000E-05 | global batch size: "
            f"{lay.global_batch_size:5d} | lm loss: 8.123456E+00 | loss scale: 1.0 | grad norm: 1.234 | "
            "number of skipped iterations:   0 | number of nan iterations:   0 |")
        if i == min(10, len(times)):
            lines.append(f"[Rank 0] (after {i} iterations) memory (MB) | allocated: 20480.1 | max allocated: "
                         f"{peak_mb:.1f} | reserved: 65000.0 | max reserved: 65000.0")
    return "\n".join(lines) + "\n"


def torchtitan_log(plan, times: np.ndarray) -> str:
    lay, world = plan.layout, plan.cluster.num_gpus
    tokens = lay.global_batch_size * plan.model_spec().seq_len
    red, green, blue, reset = "\x1b[31m", "\x1b[32m", "\x1b[34m", "\x1b[39m"
    lines = ["[rank0]:[titan] 2026-12-01 10:00:00,000 - root - INFO - Training starts at step 1"]
    for i, t in enumerate(times, 1):
        tps = tokens / t / world
        lines.append(f"[rank0]:[titan] 2026-12-01 10:00:{i:02d},123 - root - INFO - {red}step: {i:2}  "
                     f"{green}loss:  7.8123  grad_norm:  1.2345  {blue}memory: 55.12GiB(69.58%)  "
                     f"tps: {round(tps):,}  tflops: 345.67  mfu: 34.95%{reset}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logplans")
    out = {}
    for name, flags in {
        "megatron": ["--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus", "64", "--seq-len", "8192",
                     "--global-batch-tokens", "4M", "--framework", "megatron-core"],
        "megatron2": ["--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus", "32", "--seq-len", "4096",
                      "--global-batch-tokens", "2M", "--framework", "megatron-core"],
        "torchtitan": ["--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus", "16", "--seq-len", "8192",
                       "--global-batch-tokens", "1M", "--framework", "torchtitan"],
    }.items():
        proc = cli_in_process("plan", *flags, "--out", str(tmp / name), "--json")
        assert proc.returncode == 0, proc.stderr
        out[name] = tmp / name / "plan.yaml"
    return out


def _calibrate(tmp_path, *pairs, extra=()):
    argv = ["calibrate"]
    for log, plan in pairs:
        argv += ["--log", str(log), "--plan", str(plan)]
    out = tmp_path / "profile.yaml"
    proc = cli_in_process(*argv, *extra, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out


def _predict(plan_path, profile_path) -> float:
    proc = cli_in_process("predict", "--config", str(plan_path), "--profile", str(profile_path), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["step_time_s"]["total"]


@pytest.mark.parametrize("kind", ["megatron", "torchtitan"])
def test_calibrating_on_a_log_predicts_its_steps_within_5pct(kind, plans, tmp_path):
    plan = load_plan(plans[kind])
    framework = plan.predicted["framework"]
    times = _true_steps(plan, framework, seed=1)
    log = tmp_path / f"{kind}.log"
    log.write_text(megatron_log(plan, times) if kind == "megatron" else torchtitan_log(plan, times))
    shipped = plan.predicted["step_time_s"]
    assert abs(shipped / np.median(times[3:]) - 1) > 0.08  # the shipped profile is off here
    res, prof = _calibrate(tmp_path, (log, plans[kind]))
    row = res["runs"][0]
    assert row["measured_step_time_s"] == pytest.approx(float(np.median(times[3:])), rel=1e-3)
    predicted = _predict(plans[kind], prof)
    steps = times[3:]
    assert np.all(np.abs(predicted / steps - 1) < 0.05), (predicted, steps.min(), steps.max())
    assert yaml.safe_load(prof.read_text())["source"].startswith("calibrated on")


def test_a_profile_fitted_on_two_logs_predicts_a_third_layout(plans, tmp_path):
    """Fitted on a Megatron and a torchtitan log, the profile predicts a Megatron run of
    another layout (never logged to the fit) within 5 %."""
    logs = {}
    for kind in ("megatron", "torchtitan", "megatron2"):
        plan = load_plan(plans[kind])
        times = _true_steps(plan, plan.predicted["framework"], seed=len(kind))
        text = torchtitan_log(plan, times) if kind == "torchtitan" else megatron_log(plan, times)
        logs[kind] = (tmp_path / f"{kind}.log", times)
        logs[kind][0].write_text(text)
    res, prof = _calibrate(tmp_path, (logs["megatron"][0], plans["megatron"]),
                           (logs["torchtitan"][0], plans["torchtitan"]))
    assert len(res["runs"]) == 2
    held = _predict(plans["megatron2"], prof)
    assert abs(held / np.median(logs["megatron2"][1][3:]) - 1) < 0.05


def test_each_log_format_is_read(plans):
    plan = load_plan(plans["megatron"])
    times = np.array([1.0, 1.1, 1.2, 1.3, 1.4])
    meg = parse_log(megatron_log(plan, times, peak_mb=1000.0))
    assert meg.framework == "megatron" and meg.step_time_s == pytest.approx(list(times))
    assert meg.peak_memory_gb == pytest.approx(1000 * 2**20 / 1e9)  # MiB -> GB
    assert meg.global_batch_size == plan.layout.global_batch_size
    tokens = plan.layout.global_batch_size * plan.model_spec().seq_len
    titan = parse_log(torchtitan_log(plan, times), tokens_per_step=tokens, gpus=plan.cluster.num_gpus)
    assert titan.framework == "torchtitan"
    assert titan.step_time_s == pytest.approx(list(times), rel=1e-3)  # tps is rounded to an integer
    assert titan.peak_memory_gb == pytest.approx(55.12 * 2**30 / 1e9)
    ds_text = "\n".join(
        f"[2026-12-01 10:00:{i:02d},000] [INFO] [timer.py:264:stop] epoch=0/micro_step={4 * i}/global_step={i}, "
        f"RunningAvgSamplesPerSec=50.0, CurrSamplesPerSec={64 / t:.4f}, MemAllocated=10.2GB, MaxMemAllocated=30.5GB"
        for i, t in enumerate(times, 1))
    ds = parse_log(ds_text, samples_per_step=64)
    assert ds.framework == "deepspeed" and ds.step_time_s == pytest.approx(list(times), rel=1e-4)
    assert ds.peak_memory_gb == 30.5
    nemo_text = "\n".join(
        f"Training epoch 0, iteration {i}/99 | lr: 2.999e-05 | global_batch_size: 256 | global_step: {i} | "
        f"reduced_train_loss: 7.812 | train_step_timing in s: {t:.3f} | consumed_samples: {256 * i}"
        for i, t in enumerate(times, 1))
    nemo = parse_log(nemo_text)
    assert nemo.framework == "nemo" and nemo.steps == [1, 2, 3, 4, 5]
    assert nemo.step_time_s == pytest.approx(list(times))
    assert parse_log(nemo_text, "nemo").steps == nemo.steps


def test_bad_logs_get_one_line_errors(plans, tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("nothing to see\n")
    assert_clean_error(cli_in_process("calibrate", "--log", str(empty), "--plan", str(plans["megatron"])),
                       "no megatron / torchtitan / deepspeed / nemo step lines")
    assert_clean_error(cli_in_process("calibrate", "--log", str(tmp_path / "missing.log"), "--plan",
                               str(plans["megatron"])), "file not found")
    plan = load_plan(plans["megatron"])
    short = tmp_path / "short.log"
    short.write_text(megatron_log(plan, np.array([1.0, 1.0, 1.0, 1.0])))
    assert_clean_error(cli_in_process("calibrate", "--log", str(short), "--plan", str(plans["megatron"])),
                       "fewer than 2 logged steps")
    other = tmp_path / "other.log"
    other.write_text(megatron_log(plan, np.ones(8)).replace(
        f"global batch size: {plan.layout.global_batch_size:5d}", "global batch size:    7"))
    assert_clean_error(cli_in_process("calibrate", "--log", str(other), "--plan", str(plans["megatron"])),
                       "layout.global_batch_size")
    assert_clean_error(cli_in_process("calibrate", "--log", str(other)), "--plan PLAN.yaml")
