"""The arrows point one way: `costmodels` imports none of the other packages, `planner` imports
`costmodels` only (never the executor, the app or torch), so planning and calibration run
where torch is not installed."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

FORBIDDEN = {"costmodels": {"planner", "executor", "app", "torch"},
             "planner": {"executor", "app", "torch"}}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    bad = [(str(p.relative_to(ROOT)), name) for p in sorted((ROOT / package).rglob("*.py"))
           for name in _imports(p) if name.split(".")[0] in FORBIDDEN[package]]
    assert not bad, bad


def test_schedule_names_have_one_home():
    """`costmodels.pipeline.SCHEDULES` names the schedules; the plan file's type (a Literal,
    which a checker must see spelled out) is checked against it so the two cannot drift."""
    from typing import get_args

    from costmodels.pipeline import SCHEDULE_NAMES
    from costmodels.specs import Schedule

    assert get_args(Schedule) == SCHEDULE_NAMES


SOURCE_PACKAGES = ("costmodels", "planner", "executor", "app", "benchmarks")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80  # issue 18: every file readable in one sitting


def test_modules_and_functions_stay_small():
    too_long = []
    for package in SOURCE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            src = path.read_text()
            name = str(path.relative_to(ROOT))
            if len(src.splitlines()) > MAX_MODULE_LINES:
                too_long.append(f"{name}: {len(src.splitlines())} lines")
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    if n > MAX_FUNCTION_LINES:
                        too_long.append(f"{name}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, too_long
