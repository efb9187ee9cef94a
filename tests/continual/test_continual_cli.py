"""`meshplan size` / `meshplan plan` for continual runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from planner.cli import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_size_continual(capsys: pytest.CaptureFixture[str]) -> None:
    res = _json(capsys, ["size", "--continual", "--params", "8B", "--tokens", "100B",
                         "--mixture", "code=1", "--available", "code=30B", "--replay", "0.15",
                         "--old-mixture", "web=70,books=30", "--old-available", "web=5T",
                         "--json"])
    c = res["continual"]
    assert c["new_tokens"] == pytest.approx(85e9) and c["replay_tokens"] == pytest.approx(15e9)
    assert c["new"]["domains"][0]["epochs"] == pytest.approx(85 / 30)
    web = next(d for d in c["replay"]["domains"] if d["domain"] == "web")
    assert web["tokens"] == pytest.approx(10.5e9) and web["epochs"] == pytest.approx(10.5e9 / 5e12)
    assert c["new_flops"] == pytest.approx(6 * 8e9 * 85e9)  # C = 6ND
    assert c["total_flops"] == pytest.approx(6 * 8e9 * 100e9)
    # Tokens from a compute budget for the given model: D = C / 6N.
    res = _json(capsys, ["size", "--compute-flops", "6e21", "--params", "1B", "--mixture",
                         "code=1", "--replay", "0.1", "--old-mixture", "en=1", "--json"])
    assert res["continual"]["total_tokens"] == pytest.approx(1e12)
    assert res["continual"]["replay_tokens"] == pytest.approx(1e11)
    # Text output renders; errors are one line with exit status 2.
    assert main(["size", "--continual", "--params", "8B", "--tokens", "1B", "--mixture",
                 "code=1"]) == 0
    assert "Continual pretraining" in capsys.readouterr().out
    assert main(["size", "--continual", "--params", "8B", "--tokens", "1B", "--mixture",
                 "code=1", "--replay", "0.2"]) == 2
    assert "--old-mixture" in capsys.readouterr().err
    assert main(["size", "--continual", "--tokens", "1B"]) == 2
    assert "--mixture" in capsys.readouterr().err


def test_plan_continual(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["plan", "--model", "tiny", "--gpu", "cpu", "--gpus", "1", "--global-batch", "8",
            "--steps", "1000", "--json"]
    plain = _json(capsys, base)
    res = _json(capsys, base + ["--init-from", "runs/pre", "--mixture", "code=1", "--replay",
                                "0.15", "--replay-mixture", "english=1", "--lr-fraction", "0.3",
                                "--ewc-lambda", "100", "--new-available", "code=2M",
                                "--out", str(tmp_path / "p")])
    assert set(plain) <= set(res)  # every existing key kept
    c = res["continual"]
    tokens = 1000 * 8 * 128
    assert c["steps"] == 1000 and c["total_tokens"] == tokens
    assert c["new_tokens"] == pytest.approx(0.85 * tokens)
    assert c["replay_tokens"] == pytest.approx(0.15 * tokens)
    assert c["new"]["domains"][0]["epochs"] == pytest.approx(0.85 * tokens / 2e6)
    assert c["hours"] == pytest.approx(res["top"][0]["predicted_step_time_s"] * 1000 / 3600,
                                      rel=1e-4)  # the ranked table rounds step times
    assert c["new_hours"] + c["replay_hours"] == pytest.approx(c["hours"])
    plan = yaml.safe_load((tmp_path / "p" / "plan.yaml").read_text())
    assert plan["continual"]["init_from"] == "runs/pre"
    assert plan["continual"]["replay_fraction"] == 0.15
    assert plan["continual"]["replay_mixture"] == {"english": 1.0}
    assert plan["continual"]["lr_fraction"] == 0.3 and plan["continual"]["ewc_lambda"] == 100
    assert plan["data"]["mixture"] == {"code": 1.0}
    # A WSD branch: the run is the decay.
    res = _json(capsys, base + ["--schedule", "wsd", "--init-from", "runs/stable",
                                "--branch-step", "500", "--decay-steps", "100",
                                "--out", str(tmp_path / "b")])
    assert res["continual"]["steps"] == 100
    plan = yaml.safe_load((tmp_path / "b" / "plan.yaml").read_text())
    assert plan["continual"]["branch_step"] == 500 and plan["continual"]["decay_steps"] == 100
    assert main(base[:-1] + ["--replay", "0.1"]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_plan_continual_flag_errors(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", "--model", "tiny", "--gpu", "cpu", "--gpus", "1", "--global-batch", "8",
            "--steps", "100", "--init-from", "runs/x"]
    for extra, want in ((["--lr-fraction", "0"], "--lr-fraction: Input should be greater"),
                        (["--replay", "1.2"], "--replay: Input should be less than 1"),
                        (["--branch-step", "5"], "needs continual.decay_steps"),
                        (["--replay", "0.1"], "--replay needs --replay-mixture")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
