"""`meshplan dashboard` argument handling and the run-directory reader."""

from __future__ import annotations

import json

import pytest

from app.commands import MAIN, streamlit_command
from app.rundir import find_runs, read_run
from costmodels.errors import MeshplanError
from planner.cli import main
from tests.app.conftest import write_run_dir


def test_streamlit_command_line():
    cmd = streamlit_command(8600, headless=True)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(MAIN)
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert streamlit_command(8600, headless=False)[cmd.index("--server.headless") + 1] == "false"
    assert MAIN.is_file()


def test_bad_port_is_a_clean_error(capsys):
    assert main(["dashboard", "--port", "70000", "--headless"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshplan: error: --port=70000") and len(err.splitlines()) == 1


def test_dashboard_is_a_registered_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["dashboard", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--headless" in out


def test_read_run_skips_torn_lines_and_finds_runs(tmp_path):
    d = write_run_dir(tmp_path)
    run = read_run(d)
    assert len(run.metrics) == 30  # the torn 31st line is dropped
    assert run.skipped_steps == [12, 13]
    assert run.rollbacks == [(10, 14)]
    assert run.eval_columns == ["eval_loss", "eval_loss_code", "eval_loss_english"]
    pvm = run.predicted_vs_measured().set_index("quantity")
    assert pvm.loc["step time (s)", "measured"] == 0.5
    assert pvm.loc["peak memory (GB)", "measured"] == pytest.approx(2.0)
    assert find_runs(tmp_path) == [d]


def test_read_run_falls_back_to_metrics_and_reports_bad_dirs(tmp_path):
    d = write_run_dir(tmp_path)
    (d / "summary.json").write_text(json.dumps({"predicted": {"step_time_s": 1.0}}))
    pvm = read_run(d).predicted_vs_measured().set_index("quantity")
    # Mean of the good steps after the first (skipped 12, 13 excluded): every step took 0.5 s.
    assert pvm.loc["step time (s)", "measured"] == pytest.approx(0.5)
    (d / "summary.json").write_text("{broken")
    with pytest.raises(MeshplanError, match="not valid JSON"):
        read_run(d)
    with pytest.raises(MeshplanError, match="enter the path"):
        read_run("  ")
