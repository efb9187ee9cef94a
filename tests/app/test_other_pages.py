"""Compare, Size, Data, Schedule, Runs and Accuracy pages (AppTest): each renders without an
exception, a changed input changes the output, and bad input is a visible message."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.app.conftest import write_run_dir
from tests.conftest import PUBLISHED_RUNS, cli_in_process


def _errors(at):
    return [e.value for e in at.error]


# --------------------------------------------------------------------------- compare


def test_compare_layouts_and_accelerators(page):
    at = page("compare")
    assert not at.exception and not at.error
    assert len(at.table[0].value.columns) == 2
    assert len(at.get("plotly_chart")) == 2
    at.multiselect(key="cmp_layouts").set_value([0, 1, 2]).run()
    assert len(at.table[0].value.columns) == 3
    at.radio(key="cmp_mode").set_value("two accelerators").run()
    assert not at.exception
    t = at.table[0].value
    assert list(t.columns) == ["h100-sxm", "h200"]
    assert t.loc["HBM GB", "h200"] == "141"
    assert any("tokens/s per GPU" in i.value for i in at.info)


def test_compare_needs_two_layouts(page):
    at = page("compare")
    at.multiselect(key="cmp_layouts").set_value([0]).run()
    assert not at.exception
    assert any("pick two or three" in e for e in _errors(at))


# --------------------------------------------------------------------------- size


def test_size_answers_change_with_budget(page):
    at = page("size")
    assert not at.exception and not at.error
    answers = at.table[0].value
    assert len(answers) == 2
    assert len(at.get("plotly_chart")) == 2
    known = at.table[1].value
    assert {"LLaMA-3 8B", "LLaMA-3 405B", "Chinchilla 70B", "GPT-3 175B"} <= set(known.index)
    at.text_input(key="size_flops").input("1e22").run()
    assert at.table[0].value.iloc[1]["params"] != answers.iloc[1]["params"]
    at.text_input(key="size_inf").input("2T").run()
    assert len(at.table[0].value) == 3
    assert any("lifetime FLOPs" in i.value for i in at.info)


def test_size_cluster_budget_and_bad_input(page):
    at = page("size")
    at.radio(key="size_budget_mode").set_value("cluster x days").run()
    assert not at.exception and not at.error
    # 2048 GPUs x 30 days x 86,400 s x 989.4 TFLOP/s x 40% MFU = 2.101e24 FLOPs
    assert "Budget: 2.101e+24" in " ".join(c.value for c in at.caption)
    at = page("size")
    at.text_input(key="size_flops").input("a lot").run()
    assert not at.exception
    assert any("Training FLOPs" in e for e in _errors(at))


# --------------------------------------------------------------------------- data


def test_data_mixture_epochs_and_warnings(page):
    at = page("data")
    assert not at.exception and not at.error
    t = at.table[0].value
    assert list(t.index) == ["web", "code", "wiki+books", "academic", "other"]
    # 17% of 15T over 200B unique code tokens = 12.75 epochs: past the 4-epoch threshold.
    assert t.loc["code", "epochs"] == "12.75"
    assert any("'code' repeats" in w.value for w in at.warning)
    at.text_input(key="data_tokens").input("2T").run()
    assert at.table[0].value.loc["code", "epochs"] == "1.70"
    assert not at.warning


def test_data_token_estimate_and_bad_inputs(page):
    at = page("data")
    before = at.metric[0].value
    at.text_input(key="data_size").input("1TB").run()
    assert at.metric[0].value != before
    at.text_input(key="data_size").input("huge").run()
    assert not at.exception and any("--data-size" in e for e in _errors(at))
    at = page("data")
    at.text_input(key="data_tokens").input("-5").run()
    assert not at.exception and any("Training tokens" in e for e in _errors(at))


# --------------------------------------------------------------------------- schedule


def test_schedule_curves_follow_steps(page):
    at = page("schedule")
    assert not at.exception and not at.error
    t = at.table[0].value
    assert list(t.columns) == ["cosine", "wsd"]
    at.number_input(key="sched_steps").set_value(2000).run()
    assert at.table[0].value.index[1] == "LR at step 1,000"
    assert "Cosine vs WSD over 2,000 steps" in str(at.get("plotly_chart")[0].proto.spec)
    at.number_input(key="sched_warmup").set_value(5000).run()
    assert not at.exception and any("Warmup steps" in e for e in _errors(at))


def test_schedule_reads_plan_and_batch_calculator(page):
    at = page("schedule", run=False)
    at.session_state["meshplan_plan"] = {
        "steps": 1234, "lr": 3e-5, "params": 70e9, "seq_len": 8192, "global_batch": 2048,
        "dp": 64, "micro": 2, "model": "llama3-70b",
    }
    at.run()
    assert not at.exception
    assert at.number_input(key="sched_steps").value == 1234
    accum = {m.label: m.value for m in at.metric}
    # 16M tokens / (2 x 64 x 8192) = 15.26 -> 15 accumulation steps.
    assert accum["gradient accumulation"] == "15"
    at.number_input(key="sched_dp").set_value(1500).run()
    assert any("off the target" in w.value for w in at.warning)


# --------------------------------------------------------------------------- runs


def test_runs_page_curves_and_markers(page, run_dir, tmp_path):
    at = page("runs", run=False)
    at.session_state["runs_root"] = str(tmp_path / "empty")
    at.run()
    assert not at.exception
    assert any("metrics.jsonl" in i.value for i in at.info)
    at = page("runs", run=False)
    at.session_state["runs_root"] = str(run_dir.parent)
    at.run()
    assert at.selectbox(key="runs_pick").value == str(run_dir)  # the newest run is picked
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["steps"] == "30" and metrics["skipped steps"] == "2"
    assert metrics["rollbacks"] == "1"
    charts = [str(c.proto.spec) for c in at.get("plotly_chart")]
    assert any("eval_loss_code" in c for c in charts)
    assert any("rollback" in c for c in charts) and any("skipped" in c for c in charts)
    pvm = at.table[0].value
    assert pvm.loc["step time (s)", "measured / predicted"] == "1.25"


def test_runs_page_without_eval_and_bad_paths(page, tmp_path):
    d = write_run_dir(tmp_path, domains=False, rollback=None, skipped=())
    at = page("runs")
    at.text_input(key="runs_path").input(str(d)).run()
    assert not at.exception and not at.error
    assert not any("eval" in str(c.proto.spec) for c in at.get("plotly_chart"))
    at.text_input(key="runs_path").input(str(tmp_path / "nope")).run()
    assert not at.exception and any("not found" in e for e in _errors(at))
    shutil.rmtree(d)
    d.mkdir()
    at.text_input(key="runs_path").input(str(d)).run()
    assert any("no metrics.jsonl" in e for e in _errors(at))


# --------------------------------------------------------------------------- accuracy


@pytest.fixture
def small_runs(tmp_path, published_runs):
    lines = published_runs.read_text().splitlines()
    p = tmp_path / "mine.csv"
    p.write_text("\n".join(lines[:13]) + "\n")
    return p


def test_accuracy_page_before_after_and_breakdowns(page, published_runs):
    at = page("accuracy")
    assert not at.exception and not at.error
    summary = at.table[0].value
    assert len(summary.columns) == 2
    before = float(summary.iloc[:, 0]["MAPE %"])
    after = float(summary.iloc[:, 1]["MAPE %"])
    assert after < before  # the shipped fitted profile beats the built-in starting values
    assert "source_id" in at.table[1].value.index.name
    assert at.table[2].value.index.name == "gpu"
    assert len(at.get("plotly_chart")) == 1


def test_accuracy_own_runs_profile_and_errors(page, small_runs, tmp_path):
    at = page("accuracy")
    full = int(at.table[0].value.iloc[:, 1]["rows scored"])
    at.text_input(key="acc_csv").input(str(small_runs)).run()
    assert not at.exception and not at.error
    assert int(at.table[0].value.iloc[:, 1]["rows scored"]) < full
    prof = tmp_path / "p.yaml"
    prof.write_text("link_eff: 0.5\nsource: my calibration\n")
    at.text_input(key="acc_profile").input(str(prof)).run()
    assert not at.exception
    assert len(at.table[0].value.columns) == 3
    assert at.table[0].value.iloc[:, 2]["profile"] == "my calibration"
    prof.write_text("link_eff: fast\n")
    at.text_input(key="acc_profile").input(str(prof)).run()
    assert not at.exception and any("not a number" in e for e in _errors(at))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    at.text_input(key="acc_profile").input("").run()
    at.text_input(key="acc_csv").input(str(bad)).run()
    assert not at.exception and any("missing column" in e for e in _errors(at))


def test_accuracy_missing_csv_is_a_message(page):
    at = page("accuracy")
    at.text_input(key="acc_csv").input("/nonexistent/runs.csv").run()
    assert not at.exception and any("not found" in e for e in _errors(at))


assert PUBLISHED_RUNS.name == "published_runs.csv"


def test_data_sample_upload_measures_bytes_per_char(page):
    at = page("data")
    at.radio(key="data_how").set_value("uploaded sample").run()
    assert any("Upload a sample" in i.value for i in at.info)
    text = "한국어 문장입니다. " * 200  # Hangul: 3 UTF-8 bytes per syllable
    at.selectbox(key="data_lang").set_value("ko")
    at.file_uploader(key="data_sample").upload("ko.txt", text.encode(), "text/plain").run()
    assert not at.exception and not at.error
    raw = len(text.encode())
    assert any(f"{raw / len(text):.2f} bytes/char" in c.value for c in at.caption)
    at.text_input(key="data_corpus_size").input("1TB").run()
    # 1e12 bytes / (2.0 chars/token x measured bytes/char)
    expected = 1e12 / (2.0 * raw / len(text))
    assert at.metric[0].value == f"{expected / 1e9:.2f}B"
    at.file_uploader(key="data_sample").upload("bin.txt", b"\xff\xfe\x00", "text/plain").run()
    assert not at.exception and any("not UTF-8" in e for e in _errors(at))


def test_accuracy_csv_upload(page, published_runs):
    at = page("accuracy")
    lines = published_runs.read_text().splitlines()
    at.file_uploader(key="acc_upload").upload("mine.csv", ("\n".join(lines[:8]) + "\n").encode(),
                                             "text/csv").run()
    assert not at.exception and not at.error
    assert int(at.table[0].value.iloc[:, 1]["rows scored"]) + \
        int(at.table[0].value.iloc[:, 1]["rows skipped"]) == 7


@pytest.mark.parametrize("gpu", ["h100-sxm", "h100-hbm2e-lowpower", "a100-80gb", "b200", "mi300x"])
def test_size_page_equals_meshplan_size(page, gpu):
    """The Size page and `meshplan size` call the same functions (`planner.sizing`): the same
    cluster budget gives the same FLOPs (the 500 W H100's derate included) and answers."""
    cli = json.loads(cli_in_process("size", "--gpus", "512", "--days", "20", "--gpu", gpu,
                                    "--mfu", "35", "--fit", "besiroglu", "--json").stdout)
    at = page("size")
    at.radio(key="size_budget_mode").set_value("cluster x days").run()
    at.selectbox(key="size_acc").set_value(gpu)
    at.number_input(key="size_gpus").set_value(512)
    at.number_input(key="size_days").set_value(20.0)
    at.slider(key="size_mfu").set_value(35.0).run()
    assert not at.exception and not at.error
    shown = json.loads(at.json[0].value)
    assert shown["budget"] == cli["budget"]
    for key in ("rule_of_20", "parametric", "fits"):
        assert shown[key] == cli[key], key
