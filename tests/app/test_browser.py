"""Real-browser test: `meshplan dashboard --port P --headless` served on localhost, Debian's
headless Chromium loads the Plan page with default inputs, the rendered DOM holds the ranked
layouts table (header with "tokens/s" and "MFU"), and a screenshot is kept as an artifact
(in $MESHPLAN_ARTIFACTS_DIR, default out/test-artifacts/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.app.cdp import Browser, chromium_path, dashboard_server, free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MESHPLAN_ARTIFACTS_DIR", ROOT / "out" / "test-artifacts"))

pytestmark = [
    pytest.mark.skipif(chromium_path() is None,
                       reason="chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.timeout(300),
]


def test_plan_page_in_headless_chromium():
    pytest.importorskip("websockets", reason="websockets (a streamlit dependency) is missing")
    with dashboard_server(free_port(), timeout=90) as url, Browser() as browser:
        browser.goto(url + "/")
        text = browser.wait_for_text("tokens/s", timeout=180)
        headers = browser.evaluate(
            "Array.from(document.querySelectorAll('table thead th')).map(e => e.innerText)")
        header = " ".join(headers or [])
        assert "tokens/s" in header and "MFU" in header, headers
        rows = browser.evaluate("document.querySelectorAll('table tbody tr').length")
        assert rows == 10
        assert "Ranked layouts" in text and "Traceback" not in text
        shot = browser.screenshot(ARTIFACTS / "dashboard_plan.png")
    assert shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
