"""Take the README screenshots: serve the dashboard, load each page in headless Chromium,
wait for it to finish drawing, and save docs/img/<page>.png.

    .venv/bin/python docs/screenshots.py [--runs-dir DIR]

`--runs-dir` is where the Runs page looks for `meshplan run` outputs (default: a small
synthetic run written to a temporary directory)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.app.cdp import Browser, dashboard_server, free_port  # noqa: E402
from tests.app.conftest import write_run_dir  # noqa: E402

# page url -> text that shows the page has drawn its main output
PAGES = {
    "plan": "tokens/s", "compare": "tokens/s/GPU", "size": "compute-optimal",
    "data": "Epochs per domain", "schedule": "gradient accumulation",
    "runs": "Predicted vs measured", "accuracy": "Error by GPU",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", help="directory holding meshplan run outputs")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--pages", default=",".join(PAGES))
    args = ap.parse_args(argv)
    runs = args.runs_dir
    if not runs:
        runs = tempfile.mkdtemp(prefix="meshplan-runs-")
        write_run_dir(Path(runs), steps=60)
    os.environ["MESHPLAN_RUNS_DIR"] = runs
    out = Path(args.out)
    with dashboard_server(free_port(), timeout=120) as url, Browser(height=1400) as b:
        for name in args.pages.split(","):
            b.call("Emulation.setDeviceMetricsOverride", width=1500, height=1400,
                   deviceScaleFactor=1, mobile=False)
            b.goto(f"{url}/" if name == "plan" else f"{url}/{name}")  # the default page lives at /
            b.wait_for_text(PAGES[name], timeout=240)
            path = b.screenshot(out / f"{name}.png", settle_s=2.5)
            print(f"{path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
