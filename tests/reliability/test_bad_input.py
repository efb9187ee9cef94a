"""Bad input never crashes: property-based tests (hypothesis) over the plan schema, the CLI
flags and the validate CSV reader. Every case ends in success or in exit code 2 with one
`error:` line, never a traceback (any other exception fails the test with its case), never
a hang (a SIGALRM guard per call). Plan files are read with a safe YAML loader only."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costmodels.hardware import ACCELERATORS
from costmodels.presets import PRESETS
from tests.reliability.helpers import (
    CASE_COUNTS,
    PARTIAL_FILES,
    ROOT,
    TRACEBACKS,
    assert_clean,
    run_subprocess,
)
from tests.reliability.helpers import call_cli as _call_cli


def _out_path(argv: list[str]) -> Path | None:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--out="):
            return Path(a[len("--out="):])
    return None


def _files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


def call_cli(argv: list[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """`helpers.call_cli`, counting what a user must never see: a traceback (an exception
    that is not a one-line error), or files a failed command left under its `--out`
    (and temp files beside it, whatever the outcome)."""
    out = _out_path(argv)
    before = _files(out) if out else set()
    try:
        rc, stdout, err = _call_cli(argv, timeout)
    except Exception as exc:
        TRACEBACKS.append(f"{argv!r}: {type(exc).__name__}: {exc}"[:500])
        raise
    if "Traceback" in err + stdout:
        TRACEBACKS.append(f"{argv!r}: {err[-300:]}")
    if out is not None:
        left = sorted(_files(out) - before) if rc != 0 else []
        left += [str(p) for p in out.parent.glob("*") if ".tmp" in p.name]
        if left:
            PARTIAL_FILES.append(f"{argv!r}: {left[:3]}")
        assert not left, (argv, rc, left)
    return rc, stdout, err

# `benchmarks/bad_input.py` scales every family's case count (env MESHPLAN_BAD_INPUT_SCALE).
SCALE = float(os.environ.get("MESHPLAN_BAD_INPUT_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


SETTINGS = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

# --------------------------------------------------------------------------- values

# Strings a user (or a broken script) might type for a number or a name.
NASTY_STRINGS = [
    "-1", "0", "-0", "nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e308",
    "99999999999999999999", "1.5", "0.0", "", " ", "null", "None", "true", "[]", "{}", "0x10",
    "1_000", "٣", "８", "🚀", "é", "\x00", "--", "-", "1e-400", "4M", "-4M", "4Mi", "abc",
    "h100", "H100-SXM", "llama3-8b ", "ZERO3", "1,2", "2**10", "1e3", "+5",
]
nasty_text = st.one_of(
    st.sampled_from(NASTY_STRINGS),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
# Python values for YAML plan fields.
nasty_value = st.one_of(
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**18]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NASTY_STRINGS),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2),
)


def _flag_args(flags: dict[str, str]) -> list[str]:
    # `--flag=value`, so values starting with "-" reach the command's own checks.
    return [f"--{k}={v}" for k, v in flags.items()]


def _draw_flags(data: st.DataObject, valid: dict[str, st.SearchStrategy[str]],
                required: tuple[str, ...] = (), bad_share: float = 0.3) -> dict[str, str]:
    names = sorted(valid)
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    out: dict[str, str] = {}
    for name in [*required, *[n for n in chosen if n not in required]]:
        bad = data.draw(st.floats(0, 1)) < bad_share
        out[name] = data.draw(nasty_text if bad else valid[name])
    return out


def _finite_tree(x: object) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite_tree(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite_tree(v) for v in x)
    return True


# --------------------------------------------------------------------------- CLI flags

SMALL_MODELS = ["tiny", "tiny-mha", "small", "llama3-8b", "llama2-7b", "mixtral-8x7b",
                "gpt3-175b"]
ints = lambda *vals: st.sampled_from([str(v) for v in vals])  # noqa: E731

PREDICT_FLAGS = {
    "model": st.sampled_from(SMALL_MODELS),
    "gpu": st.sampled_from(sorted(ACCELERATORS)),
    "gpus": ints(1, 2, 4, 8, 16, 64),
    "gpus-per-node": ints(1, 2, 8),
    "seq-len": ints(512, 2048, 4096, 8192),
    "tp": ints(1, 2, 4, 8),
    "pp": ints(1, 2, 4),
    "dp": ints(1, 2, 4, 8),
    "cp": ints(1, 2),
    "ep": ints(1, 2),
    "vpp": ints(1, 2),
    "micro-batch": ints(1, 2, 4),
    "global-batch": ints(8, 64, 512),
    "sharding": st.sampled_from(["none", "zero1", "zero2", "zero3"]),
    "recompute": st.sampled_from(["none", "selective", "full"]),
    "precision": st.sampled_from(["bf16", "fp8", "fp16", "fp32"]),
    "schedule": st.sampled_from(["gpipe", "1f1b", "interleaved"]),
    "nvlink-gbps": ints(0, 100, 450.5),
    "nic-gbps": ints(0, 25, 50),
}


@settings(SETTINGS, max_examples=examples(150))
@given(data=st.data())
def test_predict_flags(data) -> None:
    flags = _draw_flags(data, PREDICT_FLAGS, required=("model", "gpus"))
    argv = ["predict", *_flag_args(flags), "--json"]
    CASE_COUNTS["predict flags"] += 1
    rc, out, err = call_cli(argv)
    assert_clean(rc, err, argv=argv)
    if rc == 0:  # a prediction is finite, or it is an error
        res = json.loads(out)
        assert _finite_tree(res), (argv, out)
        assert res["step_time_s"]["total"] > 0, (argv, out)


PLAN_FLAGS = {
    "model": st.sampled_from(["tiny", "tiny-mha", "small", "llama3-8b", "llama2-7b"]),
    "gpu": st.sampled_from(sorted(ACCELERATORS)),
    "gpus": ints(1, 2, 8, 16),
    "gpus-per-node": ints(1, 8),
    "seq-len": ints(256, 2048, 8192),
    "global-batch": ints(8, 64, 256),
    "global-batch-tokens": st.sampled_from(["4096", "1M", "4Mi", "2.5M"]),
    "train-tokens": st.sampled_from(["1B", "2e9", "300M"]),
    "steps": ints(10, 1000),
    "lr": ints(3e-4, 1e-3),
    "objective": st.sampled_from(["clm", "mlm", "fim"]),
    "schedule": st.sampled_from(["cosine", "wsd", "constant"]),
    "precision": st.sampled_from(["bf16", "fp32"]),
    "max-tp": ints(0, 1, 2, 8),
    "sharding": st.sampled_from(["none,zero1", "zero3", "zero1,zero2,zero3"]),
    "recompute": st.sampled_from(["none", "none,full", "selective"]),
    "micro-batches": st.sampled_from(["1,2", "1", "4,8"]),
    "max-pp": ints(1, 4, 128),
    "headroom": ints(0, 0.05, 0.5),
    "rank-by": st.sampled_from(["throughput", "memory"]),
    "top": ints(1, 3, 10),
    "engine": st.sampled_from(["torch", "deepspeed"]),
}


@settings(SETTINGS, max_examples=examples(60))
@given(data=st.data())
def test_plan_flags(data, tmp_path_factory) -> None:
    flags = _draw_flags(data, PLAN_FLAGS, required=("model", "gpus", "global-batch"),
                        bad_share=0.25)
    out_dir = tmp_path_factory.mktemp("plan")
    argv = ["plan", *_flag_args(flags), "--json", "--out", str(out_dir)]
    if data.draw(st.booleans()):
        argv += ["--override", f"{data.draw(st.sampled_from(['train.lr', 'train.max_steps', 'layout.tp', 'nope.x', 'train.bogus']))}={data.draw(nasty_text)}"]
    CASE_COUNTS["plan flags"] += 1
    rc, out, err = call_cli(argv)
    assert_clean(rc, err, argv=argv)
    if rc == 0:
        res = json.loads(out)
        assert _finite_tree(res["top"]), (argv, out)
        from planner.planfile import load_plan

        load_plan(out_dir / "plan.yaml")  # what the planner wrote reads back


SIZE_FLAGS = {
    "compute-flops": st.sampled_from(["1e21", "3.8e25", "6e23"]),
    "gpus": ints(8, 1024),
    "days": ints(1, 30, 0.5),
    "gpu": st.sampled_from(["h100-sxm", "a100-80gb"]),
    "fit": st.sampled_from(["hoffmann", "besiroglu", "both"]),
    "inference-tokens": st.sampled_from(["1T", "0", "5e12"]),
    "data-size": st.sampled_from(["10TB", "500GiB", "1PB"]),
    "language": st.sampled_from(["en", "code", "ko"]),
    "mixture": st.sampled_from(["web=45,code=17", "web=1"]),
    "available": st.sampled_from(["web=10T,code=1T", "web=1T"]),
    "max-epochs": ints(1, 4),
    "tokens": st.sampled_from(["1T", "15T"]),
    "seq-len": ints(2048, 8192),
    "global-batch-tokens": st.sampled_from(["4Mi", "16M"]),
    "micro-batch": ints(1, 2),
    "dp": ints(1, 8),
}


@settings(SETTINGS, max_examples=examples(120))
@given(data=st.data())
def test_size_flags(data) -> None:
    flags = _draw_flags(data, SIZE_FLAGS, required=("compute-flops",))
    argv = ["size", *_flag_args(flags), "--json"]
    if data.draw(st.booleans()):
        argv.append("--open-ended")
    CASE_COUNTS["size flags"] += 1
    rc, out, err = call_cli(argv)
    assert_clean(rc, err, argv=argv)


# --------------------------------------------------------------------------- plan schema


def _base_plan() -> dict:
    return {
        "model": PRESETS["tiny-mha"].with_(seq_len=64).to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": 2},
        "layout": {"dp": 2, "micro_batch_size": 2, "global_batch_size": 8},
        "train": {"precision": "fp32", "max_steps": 10, "lr": 1e-3},
        "checkpoint": {"every": 5, "keep": 3},
        "data": {"max_docs_per_domain": 200},
    }


def _schema_paths() -> list[tuple[str, ...]]:
    from planner.planfile import Plan

    paths: list[tuple[str, ...]] = [("version",), ("predicted",), ("bogus",)]
    for name, f in Plan.model_fields.items():
        sub = getattr(f.annotation, "model_fields", None)
        if sub:
            paths += [(name, k) for k in sub]
            paths.append((name, "unknown_key"))
    paths += [("model", k) for k in _base_plan()["model"]] + [("model", "extra_thing")]
    return paths


SCHEMA_PATHS = _schema_paths()


def _set(d: dict, path: tuple[str, ...], value: object) -> None:
    node = d
    for p in path[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[path[-1]] = value


@settings(SETTINGS, max_examples=examples(200))
@given(mutations=st.lists(st.tuples(st.sampled_from(SCHEMA_PATHS), nasty_value), min_size=1,
                          max_size=3),
       drop=st.lists(st.sampled_from(["model", "cluster", "layout", "train"]), max_size=1))
def test_plan_schema_fields(mutations, drop, tmp_path_factory) -> None:
    data = _base_plan()
    for path, value in mutations:
        _set(data, path, value)
    for section in drop:
        data.pop(section, None)
    tmp = tmp_path_factory.mktemp("schema")
    plan = tmp / "plan.yaml"
    plan.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    argv = ["launch", str(plan), "--slurm", "--out", str(tmp / "job")]
    CASE_COUNTS["plan schema"] += 1
    rc, _, err = call_cli(argv)
    assert_clean(rc, err, argv=(mutations, drop))


@settings(SETTINGS, max_examples=examples(80))
@given(key=st.one_of(st.sampled_from([".".join(p) for p in SCHEMA_PATHS] + ["", ".", "a..b",
                                                                             "layout", "=", "model.layers.x"]),
                     st.text(max_size=12)),
       value=nasty_text, raw=st.booleans())
def test_plan_overrides(key, value, raw, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("ovr")
    plan = tmp / "plan.yaml"
    plan.write_text(yaml.safe_dump(_base_plan()))
    item = key if raw else f"{key}={value}"
    argv = ["launch", str(plan), "--slurm", "--out", str(tmp / "job"), "--override", item]
    CASE_COUNTS["plan overrides"] += 1
    rc, _, err = call_cli(argv)
    assert_clean(rc, err, argv=argv)


@settings(SETTINGS, max_examples=examples(80))
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(
    lambda b: b.decode("latin-1")), st.sampled_from([
        "", "---", "[1, 2]", "model: 3", "model: {}", "? [a]\n: b", "a: &x [*x]",
        "model: !!binary aGVsbG8=", "model: !!set {a, b}", "version: 2\nmodel: {}",
        "\ufeffmodel: {}", "model:\n\t- x", "{{{{", "model: " + "[" * 500,
        "&a [*a, *a, *a]",
    ])), as_bytes=st.booleans())
def test_plan_file_garbage(text, as_bytes, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("raw")
    plan = tmp / "plan.yaml"
    if as_bytes:
        plan.write_bytes(text.encode("utf-16"))
    else:
        plan.write_text(text, encoding="utf-8", errors="surrogatepass")
    argv = ["launch", str(plan), "--slurm", "--out", str(tmp / "job")]
    CASE_COUNTS["plan files"] += 1
    rc, _, err = call_cli(argv)
    assert rc == 2, (text, err)
    assert_clean(rc, err, argv=text)


# --------------------------------------------------------------------------- validate CSV

CSV_COLUMNS = [
    "run_id", "source_id", "model_name", "model_type", "params_b", "layers", "hidden_size",
    "ffn_hidden_size", "num_heads", "num_kv_heads", "vocab_size", "num_experts", "experts_topk",
    "seq_len", "global_batch_size", "micro_batch_size", "gpu", "num_gpus", "tp", "pp", "dp",
    "cp", "ep", "vpp", "sharding", "recompute", "sequence_parallel", "precision",
    "measured_tokens_per_sec_per_gpu", "measured_step_time_s", "measured_peak_memory_gb",
]
GOOD_ROW = {
    "run_id": "r1", "source_id": "test", "model_name": "llama3-8b", "model_type": "dense",
    "params_b": "8.03", "layers": "32", "hidden_size": "4096", "ffn_hidden_size": "14336",
    "num_heads": "32", "num_kv_heads": "8", "vocab_size": "128256", "num_experts": "",
    "experts_topk": "", "seq_len": "8192", "global_batch_size": "512", "micro_batch_size": "1",
    "gpu": "h100-sxm", "num_gpus": "64", "tp": "1", "pp": "1", "dp": "64", "cp": "1",
    "ep": "1", "vpp": "", "sharding": "zero3", "recompute": "none",
    "sequence_parallel": "false", "precision": "bf16",
    "measured_tokens_per_sec_per_gpu": "9000", "measured_step_time_s": "",
    "measured_peak_memory_gb": "60",
}


@settings(SETTINGS, max_examples=examples(120))
@given(rows=st.lists(st.dictionaries(st.sampled_from(CSV_COLUMNS), nasty_text, max_size=4),
                     min_size=0, max_size=3),
       dropped=st.lists(st.sampled_from(CSV_COLUMNS), max_size=2),
       extra=st.lists(st.text(min_size=1, max_size=5), max_size=2),
       cross=st.booleans())
def test_validate_csv(rows, dropped, extra, cross, tmp_path_factory) -> None:
    cols = [c for c in CSV_COLUMNS if c not in dropped] + [e for e in extra if e not in CSV_COLUMNS]
    path = tmp_path_factory.mktemp("csv") / "runs.csv"
    with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerow(GOOD_ROW)  # one good row, so the adversarial ones meet real predictions
        for mutation in rows:
            w.writerow({**GOOD_ROW, **mutation})
    argv = ["validate", str(path), "--json", *(["--cross-validate"] if cross else [])]
    CASE_COUNTS["validate csv"] += 1
    rc, out, err = call_cli(argv)
    assert_clean(rc, err, argv=(rows, dropped, extra))
    if rc == 0:
        json.loads(out)


@settings(SETTINGS, max_examples=examples(40))
@given(blob=st.one_of(st.binary(max_size=300), st.sampled_from([
    b"", b"\n", b"run_id\n", b"\xff\xfe\x00", b'"unterminated\n', b"a,b\n1,2,3,4\n",
    (",".join(CSV_COLUMNS) + "\n").encode(), (",".join(CSV_COLUMNS) + "\n" + ","
                                              * 40 + "\n").encode(),
])))
def test_validate_csv_garbage_bytes(blob, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("blob") / "runs.csv"
    path.write_bytes(blob)
    argv = ["validate", str(path), "--json"]
    CASE_COUNTS["validate csv"] += 1
    rc, _, err = call_cli(argv)
    assert_clean(rc, err, argv=blob)


# --------------------------------------------------------------------------- HF config.json

HF_BASE = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256,
           "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 4,
           "vocab_size": 8192, "max_position_embeddings": 1024, "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
HF_KEYS = [*HF_BASE, "head_dim", "num_local_experts", "num_experts_per_tok", "n_routed_experts",
           "moe_intermediate_size", "first_k_dense_replace", "rope_parameters", "kv_lora_rank",
           "q_lora_rank", "sliding_window", "n_layer", "n_embd", "torch_dtype"]


@settings(SETTINGS, max_examples=examples(100))
@given(mutations=st.lists(st.tuples(st.sampled_from(HF_KEYS), nasty_value), max_size=3),
       dropped=st.lists(st.sampled_from(list(HF_BASE)), max_size=2),
       raw=st.one_of(st.none(), st.text(max_size=80), st.sampled_from(
           ["", "{", "[]", "null", "1", '{"model_type": "gpt9"}', "\ufeff{}", "NaN"])))
def test_hf_config_files(mutations, dropped, raw, tmp_path_factory) -> None:
    cfg = {k: v for k, v in HF_BASE.items() if k not in dropped}
    for key, value in mutations:
        cfg[key] = value
    path = tmp_path_factory.mktemp("hf") / "config.json"
    text = raw if raw is not None else json.dumps(cfg, allow_nan=True)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    argv = ["predict", "--hf-config", str(path), "--gpus", "8", "--json"]
    CASE_COUNTS["hf config.json"] += 1
    rc, out, err = call_cli(argv)
    assert_clean(rc, err, argv=(mutations, dropped, raw))
    if rc == 0:
        assert _finite_tree(json.loads(out)), (cfg, out)


# --------------------------------------------------------------------------- training logs

LOG_LINES = {
    "megatron": ["iteration {a}/ 100 | consumed samples: 80 | elapsed time per iteration (ms): {b} "
                 "| global batch size: {c} |", "[Rank 0] memory (MB) | allocated: 1 | max allocated: {b}"],
    "torchtitan": ["step: {a}  loss: 7.1  memory: {b}GiB(10%)  tps: {c}  mfu: 40%"],
    "deepspeed": ["global_step={a}, RunningAvgSamplesPerSec={b}, CurrSamplesPerSec={c}, "
                  "MemAllocated=1GB, MaxMemAllocated={b}GB"],
    "nemo": ["Epoch 0: global_step: {a} train_step_timing in s: {b} reduced_train_loss={c}"],
}


@settings(SETTINGS, max_examples=examples(100))
@given(framework=st.sampled_from([*LOG_LINES, None]),
       lines=st.lists(st.tuples(st.integers(0, 3), nasty_text, nasty_text, nasty_text), max_size=8),
       noise=st.lists(st.text(max_size=40), max_size=3))
def test_calibration_logs(framework, lines, noise, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("log")
    templates = [t for ts in LOG_LINES.values() for t in ts] if framework is None else LOG_LINES[framework]
    text = [templates[i % len(templates)].format(a=a, b=b, c=c) for i, a, b, c in lines] + noise
    log = tmp / "train.log"
    log.write_text("\n".join(text), encoding="utf-8", errors="surrogatepass")
    argv = ["calibrate", "--log", str(log), "--model", "llama3-8b", "--gpu", "h100-sxm",
            "--gpus", "8", "--out", str(tmp / "profile.yaml"), "--json",
            *(["--framework", framework] if framework else [])]
    CASE_COUNTS["calibration logs"] += 1
    rc, _, err = call_cli(argv)
    assert_clean(rc, err, argv=(framework, text))


# --------------------------------------------------------------------------- checkpoints


@settings(SETTINGS, max_examples=examples(60))
@given(manifest=st.one_of(
    st.text(max_size=50),
    st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats()),
                 lambda c: st.one_of(st.lists(c, max_size=3),
                                     st.dictionaries(st.text(max_size=6), c, max_size=3)),
                 max_leaves=8).map(json.dumps),
    st.builds(lambda files, step: json.dumps({"format": "meshplan-ckpt-v1", "step": step,
                                              "files": files}),
              st.dictionaries(st.sampled_from(["model.pt", "../x", "/etc/hostname", "a/b",
                                               "", "state.json"]),
                              st.one_of(st.dictionaries(st.sampled_from(["sha256", "bytes"]),
                                                        st.one_of(st.integers(-5, 10**6),
                                                                  st.text(max_size=4))),
                                        st.integers(), st.none()), max_size=2),
              st.one_of(st.integers(-5, 10**12), st.text(max_size=3), st.none())),
))
def test_checkpoint_verify_bad_manifests(manifest, tmp_path_factory) -> None:
    step = tmp_path_factory.mktemp("ck") / "step_000005"
    step.mkdir()
    (step / "model.pt").write_bytes(b"0123456789")
    (step / "manifest.json").write_text(manifest, encoding="utf-8", errors="surrogatepass")
    CASE_COUNTS["checkpoint manifests"] += 1
    rc, out, err = call_cli(["checkpoint", "verify", str(step)])
    assert "Traceback" not in err + out
    assert rc in (1, 2), (manifest, rc, out, err)
    if rc == 1:
        assert out.startswith("FAILED") and len(out.strip().splitlines()) == 1, out
    else:
        assert_clean(rc, err, argv=manifest)


# --------------------------------------------------------------------------- safe loading

EVIL_YAML = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "model: !!python/object/apply:os.system ['touch {marker}']",
    "model: !!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "model: !!python/name:os.system",
    "model: !!python/module:os",
]


@pytest.mark.parametrize("evil", EVIL_YAML)
@pytest.mark.parametrize("where", ["launch", "run", "predict-config", "predict-profile"])
def test_python_tags_are_rejected_by_the_safe_loader(tmp_path: Path, evil: str,
                                                      where: str) -> None:
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(evil.format(marker=marker))
    argv = {
        "launch": ["launch", str(f), "--slurm", "--out", str(tmp_path / "job")],
        "run": ["run", str(f), "--out", str(tmp_path / "run")],
        "predict-config": ["predict", "--config", str(f), "--gpus", "8"],
        "predict-profile": ["predict", "--model", "llama3-8b", "--gpus", "8", "--profile",
                            str(f)],
    }[where]
    CASE_COUNTS["unsafe yaml"] += 1
    rc, _, err = call_cli(argv)
    assert rc == 2, err
    assert_clean(rc, err, argv=argv)
    assert not marker.exists(), "a YAML tag ran code"


_UNSAFE = [
    (re.compile(r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"yaml\.(full_load|unsafe_load|load_all)\("), "a non-safe YAML loader"),
    (re.compile(r"Loader\s*=\s*yaml\.(Loader|FullLoader|UnsafeLoader)"), "an unsafe Loader"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"torch\.load\((?![^)]*weights_only=True)[^)]*\)"), "torch.load without "
     "weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
]


def test_no_unsafe_deserialisation_in_the_package() -> None:
    """Plans, profiles, configs and checkpoints come from users: only safe loaders."""
    bad = []
    for pkg in ("costmodels", "planner", "executor", "app"):
        for py in (ROOT / pkg).rglob("*.py"):
            text = py.read_text(encoding="utf-8")
            flat = re.sub(r"\s+", " ", text)
            for pattern, what in _UNSAFE:
                if pattern.search(flat):
                    bad.append(f"{py.relative_to(ROOT)}: {what}")
    assert not bad, bad


# --------------------------------------------------------------------------- subprocesses

SUBPROCESS_CASES = [
    (["predict", "--model", "llama3-8b", "--gpus", "8", "--tp", "0"], "tp"),
    (["predict", "--model", "llama3-8b", "--gpus", "8", "--nvlink-gbps", "nan"], "nvlink"),
    (["plan", "--model", "tiny", "--gpu", "cpu", "--gpus", "2", "--global-batch", "8",
      "--headroom=nan"], "headroom"),
    (["validate", "/dev/null"], "CSV"),
    (["size", "--compute-flops=-1e20"], "compute-flops"),
]


@pytest.mark.parametrize("argv, needle", SUBPROCESS_CASES)
def test_subprocess_bad_input_exits_2_without_traceback(argv: list[str], needle: str) -> None:
    proc = run_subprocess(*argv, timeout=120)
    CASE_COUNTS["subprocess"] += 1
    if "Traceback" in proc.stderr:
        TRACEBACKS.append(f"{argv!r}: {proc.stderr[-300:]}")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err


def test_subprocess_evil_plan_for_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    f = tmp_path / "plan.yaml"
    f.write_text(EVIL_YAML[1].format(marker=marker))
    proc = run_subprocess("run", str(f), "--out", str(tmp_path / "run"), timeout=120)
    CASE_COUNTS["subprocess"] += 1
    if "Traceback" in proc.stderr:
        TRACEBACKS.append(f"run evil plan: {proc.stderr[-300:]}")
    assert proc.returncode == 2 and not marker.exists(), proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


def test_argparse_errors_are_one_line() -> None:
    rc, _, err = call_cli(["predict", "--model", "llama3-8b", "--gpus", "eight"])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err


def test_plan_override_nan_is_rejected_when_writing(tmp_path: Path) -> None:
    argv = ["plan", "--model", "tiny", "--gpu", "cpu", "--gpus", "2", "--global-batch", "8",
            "--out", str(tmp_path / "p"), "--override", "train.lr=nan"]
    rc, _, err = call_cli(argv)
    assert rc == 2 and "train.lr" in err, err
    assert_clean(rc, err, argv=argv)


@pytest.mark.parametrize("field", ["lr", "weight_decay", "grad_clip"])
def test_plan_schema_rejects_infinite_floats(field: str) -> None:
    from planner.planfile import PlanError, plan_from_dict

    data = _base_plan()
    data["train"][field] = float("inf")
    with pytest.raises(PlanError, match=f"train.{field}"):
        plan_from_dict(data)
