"""Which profile priced a plan is said, never hidden: `meshplan plan` / `predict` print it and
write it into plan.yaml (shipped, a file, this machine's measurements with their path, or the
profile a plan carries); `costmodels` itself reads nothing of the host or the user's files."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import yaml

from costmodels.profile import dump_profile, shipped_profile
from planner.profiles import resolve_profile
from tests.conftest import ROOT, cli_in_process

PLAN = ("plan", "--model", "tiny", "--gpu", "cpu", "--gpus", "1", "--seq-len", "64",
        "--global-batch-tokens", "512", "--precision", "fp32")
# Modules that read a host or a user's files; the cost model imports none of them.
HOST_MODULES = {"os", "pathlib", "shutil", "tempfile", "subprocess", "socket", "platform",
                "glob", "io", "sys", "torch", "planner", "executor", "app"}


def test_costmodels_imports_nothing_that_reads_the_host():
    for path in sorted((ROOT / "costmodels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in HOST_MODULES, f"{path.name} imports {name}"


def _machine_profile(path: Path) -> None:
    hw = dict(shipped_profile().hardware.get("cpu", {}), fp32_tflops=0.05, host_cores=2.0)
    path.write_text(yaml.safe_dump({"hardware": {"cpu": hw}}))


def test_plan_and_predict_say_which_profile_priced_them(tmp_path, monkeypatch):
    machine = tmp_path / "machine.yaml"
    monkeypatch.setenv("MESHPLAN_MACHINE_PROFILE", str(machine))
    shipped = json.loads(cli_in_process(*PLAN, "--json").stdout)
    assert shipped["priced_by"]["kind"] == "shipped"
    assert "priced by: shipped profile" in cli_in_process(*PLAN).stdout

    _machine_profile(machine)  # what `meshplan bench` records
    assert resolve_profile()[1].path == str(machine)
    proc = cli_in_process(*PLAN, "--out", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    assert f"this machine's measured hardware ({machine})" in proc.stdout
    written = yaml.safe_load((tmp_path / "p" / "plan.yaml").read_text())
    assert written["predicted"]["priced_by"]["kind"] == "machine"
    assert written["predicted"]["priced_by"]["path"] == str(machine)
    assert written["profile"]["hardware"]["cpu"]["fp32_tflops"] == 0.05
    # the machine's figures changed the price: the same plan under the shipped profile differs
    assert written["predicted"]["step_time_s"] != shipped["top"][0]["predicted_step_time_s"]

    prof_file = tmp_path / "mine.yaml"
    prof_file.write_text(dump_profile(shipped_profile()))
    by_file = json.loads(cli_in_process(*PLAN, "--profile", str(prof_file), "--json").stdout)
    assert by_file["priced_by"] == {"kind": "file", "path": str(prof_file),
                                    "describe": f"profile file {prof_file}"}

    again = json.loads(cli_in_process("predict", "--config", str(tmp_path / "p" / "plan.yaml"),
                                      "--json").stdout)
    assert again["priced_by"]["kind"] == "plan" and again["matches_plan"]
    assert str(machine) in again["priced_by"]["describe"]  # where the plan's profile came from
    machine.unlink()
    flags = json.loads(cli_in_process("predict", "--model", "tiny", "--gpu", "cpu", "--gpus", "1",
                                      "--json").stdout)
    assert flags["priced_by"]["kind"] == "shipped"
