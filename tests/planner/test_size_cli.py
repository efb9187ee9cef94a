"""`meshplan size`: JSON contract, numbers, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from costmodels.hardware import get_accelerator
from planner.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_json(capsys, *argv: str) -> dict:
    rc = main(["size", *argv, "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def run_error(capsys, *argv: str) -> str:
    rc = main(["size", *argv])
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshplan: error: "), cap.err
    return lines[0]


def test_compute_flops_contract(capsys):
    res = run_json(capsys, "--compute-flops", "3.8e25")
    r20 = res["rule_of_20"]
    assert r20["params"] == math.sqrt(3.8e25 / 120)
    assert r20["tokens"] == pytest.approx(20 * r20["params"])
    assert r20["flops"] == 3.8e25
    par = res["parametric"]
    for key in ("params", "tokens", "loss", "fit", "source"):
        assert key in par
    assert par["fit"] == "besiroglu" and "Besiroglu" in par["source"]
    assert 6 * par["params"] * par["tokens"] == pytest.approx(3.8e25)
    assert set(res["fits"]) == {"besiroglu", "hoffmann"}
    assert "Hoffmann" in res["fits"]["hoffmann"]["source"]
    assert res["reference"]["llama3_8b"]["besiroglu"]["tokens_per_param"] == pytest.approx(1875)


def test_fit_selection(capsys):
    res = run_json(capsys, "--compute-flops", "5.76e23", "--fit", "hoffmann")
    assert res["parametric"]["fit"] == "hoffmann" and set(res["fits"]) == {"hoffmann"}
    # Hoffmann's Approach 3 optimum at the Gopher budget: ~40B (Fig. 1), rounding bias -> 25%.
    assert res["parametric"]["params"] == pytest.approx(40e9, rel=0.25)
    res = run_json(capsys, "--compute-flops", "5.76e23", "--fit", "besiroglu")
    assert res["parametric"]["params"] == pytest.approx(70e9, rel=0.10)  # Chinchilla 70B


def test_inference_optimal_is_smaller(capsys):
    res = run_json(capsys, "--compute-flops", "1e24", "--inference-tokens", "50T")
    io = res["inference_optimal"]
    assert io["params"] < res["parametric"]["params"]
    assert io["loss"] == pytest.approx(res["parametric"]["loss"])
    assert io["savings_pct"] > 0
    assert set(res["inference_optimal_fits"]) == {"besiroglu", "hoffmann"}
    assert "lifetime_overhead" in res["reference"]["llama3_8b"]["hoffmann"]


def test_cluster_budget(capsys):
    res = run_json(capsys, "--gpus", "1024", "--days", "10", "--gpu", "h100-sxm", "--mfu", "38")
    peak = get_accelerator("h100-sxm").bf16_tflops
    assert res["budget"]["flops"] == pytest.approx(1024 * 10 * 86400 * peak * 1e12 * 0.38)
    res = run_json(capsys, "--gpus", "8", "--days", "1", "--gpu", "h100-sxm")
    assert res["budget"]["mfu_pct"] == 40.0


def test_data_mixture_and_batch(capsys):
    res = run_json(
        capsys, "--compute-flops", "1e23", "--data-size", "10TB", "--language", "code",
        "--mixture", "web=45,code=17,wiki+books=20,academic=8,other=10",
        "--available", "code=50B", "--seq-len", "4096", "--global-batch-tokens", "4Mi",
        "--dp", "8",
    )
    d = res["data"]
    assert d["tokens"] == pytest.approx(1e13 / 3.5)
    mix = {row["domain"]: row for row in d["mixture"]["domains"]}
    assert d["mixture"]["total_tokens"] == pytest.approx(res["parametric"]["tokens"])
    assert mix["code"]["epochs"] == pytest.approx(0.17 * res["parametric"]["tokens"] / 50e9)
    assert (mix["code"]["warning"] is not None) == (mix["code"]["epochs"] > 4)
    b = res["batch"]
    assert b["tokens"] == 4 * 2**20 and b["grad_accum"] == 128 and b["global_batch"] == 1024
    assert b["steps"] == math.ceil(res["parametric"]["tokens"] / b["tokens"])
    lr = res["lr"]
    assert lr["max_steps"] == b["steps"] and lr["schedule"] == "cosine"
    assert lr["min_lr"] == pytest.approx(lr["max_lr"] / 10)


def test_mixture_with_explicit_tokens_only(capsys):
    res = run_json(capsys, "--mixture", "a=1,b=1", "--available", "a=1B", "--tokens", "10B")
    assert "rule_of_20" not in res
    rows = res["data"]["mixture"]["domains"]
    assert rows[0]["epochs"] == pytest.approx(5.0) and rows[0]["warning"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        ((), "--compute-flops"),
        (("--compute-flops", "1e23", "--gpus", "8"), "alternatives"),
        (("--gpus", "8", "--days", "1"), "--gpu"),
        (("--gpus", "8", "--days", "1", "--gpu", "tpu9"), "unknown accelerator"),
        (("--compute-flops", "lots"), "--compute-flops"),
        (("--compute-flops", "1e23", "--mixture", "web"), "--mixture"),
        (("--compute-flops", "1e23", "--available", "code=1B"), "--mixture"),
        (("--compute-flops", "1e23", "--sample", "/nonexistent.txt", "--tokenizer", "/x.json"),
         "--sample"),
        (("--compute-flops", "1e23", "--seq-len", "4096"), "--global-batch-tokens"),
        (("--compute-flops", "1e23", "--mfu", "40"), "--mfu"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, argv, needle):
    assert needle in run_error(capsys, *argv)


def test_human_output(capsys):
    rc = main(["size", "--compute-flops", "3.8e25", "--inference-tokens", "2T",
               "--seq-len", "8192", "--global-batch-tokens", "16Mi"])
    out = capsys.readouterr().out
    assert rc == 0
    for needle in ("rule of 20", "besiroglu", "hoffmann", "Inference-optimal", "LLaMA-3 8B",
                   "Batch", "LR"):
        assert needle in out


def test_console_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("meshplan")
    if not exe.exists():
        pytest.skip("meshplan console script not installed")
    r = subprocess.run([str(exe), "size", "--compute-flops", "3.8e25", "--json"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rule_of_20"]["params"] == pytest.approx(math.sqrt(3.8e25 / 120))
    bad = subprocess.run([str(exe), "size"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_sample_and_tokenizer(capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    lines = [f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(300)]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=280, special_tokens=["[UNK]"],
                                                       show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "sample.py").write_text("".join(lines))
    res = run_json(capsys, "--compute-flops", "1e21", "--data-size", "1GB",
                   "--sample", str(tmp_path / "sample.py"),
                   "--tokenizer", str(tmp_path / "tokenizer.json"))
    ratio = res["data"]["ratio"]
    assert "measured on sample.py" in ratio["source"]
    assert ratio["sample_tokens"] > 0
    assert res["data"]["tokens"] == pytest.approx(1e9 / ratio["bytes_per_token"])
    assert res["data"]["epochs_at_answer"] == pytest.approx(
        res["parametric"]["tokens"] / res["data"]["tokens"])
    assert "--tokenizer" in run_error(capsys, "--compute-flops", "1e21",
                                      "--sample", str(tmp_path / "sample.py"))
