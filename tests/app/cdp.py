"""Drive Debian's headless Chromium over the DevTools protocol: load a page, wait until its
rendered text contains a string (Streamlit renders with JavaScript over a websocket, so a
plain `--dump-dom` returns before the app has drawn), read the DOM, save a screenshot.

Uses the `websockets` package (a Streamlit dependency) for the DevTools socket; nothing is
downloaded and Chromium comes from the system (`/usr/bin/chromium`)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s ({last})")


@contextlib.contextmanager
def dashboard_server(port: int, timeout: float = 60.0) -> Iterator[str]:
    """`meshplan dashboard --port P --headless` in a subprocess; yields its URL."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    fd, log_name = tempfile.mkstemp(prefix="meshplan-dashboard-", suffix=".log")
    log = os.fdopen(fd, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "dashboard", "--port", str(port), "--headless"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://localhost:{port}"
    try:
        try:
            wait_http(url + "/", timeout)
        except TimeoutError:
            log.flush()
            raise TimeoutError(Path(log_name).read_text()[-2000:]) from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
        Path(log_name).unlink(missing_ok=True)


class Browser:
    """One headless Chromium with one page, driven over its DevTools websocket."""

    def __init__(self, width: int = 1500, height: int = 1800) -> None:
        from websockets.sync.client import connect

        exe = chromium_path()
        if exe is None:
            raise FileNotFoundError("chromium not installed (apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp(prefix="meshplan-chromium-")
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        port = self._devtools_port(timeout=30)
        deadline = time.monotonic() + 20
        target = None
        while target is None and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                target = next((t for t in json.load(r) if t.get("type") == "page"), None)
            if target is None:
                time.sleep(0.2)
        if target is None:
            self.close()
            raise RuntimeError("chromium opened no page target")
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(
            target["webSocketDebuggerUrl"], max_size=256 * 1024 * 1024, open_timeout=20))
        self._id = 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _devtools_port(self, timeout: float) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"chromium exited with {self.proc.returncode}")
                continue
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                return int(m.group(1))
        raise TimeoutError("chromium did not print its DevTools address")

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self._id += 1
        mid = self._id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for_text(self, text: str, timeout: float = 90.0,
                      settle: str | None = None) -> str:
        """Poll the rendered text until it holds `text` and no Streamlit spinner / "Running"
        status is showing; returns the page text."""
        deadline = time.monotonic() + timeout
        body = ""
        while time.monotonic() < deadline:
            body = self.evaluate("document.body ? document.body.innerText : ''") or ""
            busy = self.evaluate(
                "!!document.querySelector('[data-testid=\"stStatusWidget\"]') || "
                "!!document.querySelector('[data-testid=\"stSpinner\"]')")
            if text in body and not busy and (settle is None or settle in body):
                return body
            time.sleep(0.5)
        raise TimeoutError(f"{text!r} did not appear within {timeout:.0f} s; page text: "
                           f"{body[:500]!r}")

    def screenshot(self, path: str | Path, width: int = 1500, settle_s: float = 2.0) -> Path:
        """Full-page PNG: Streamlit scrolls inside its own container, so grow the viewport to
        the content's height, let the app re-lay itself out, then capture."""
        h = self.evaluate(
            "Math.max(document.body.scrollHeight, ...Array.from("
            "document.querySelectorAll('[data-testid=\"stMain\"], section, main, div'))"
            ".map(e => e.scrollHeight))") or 1800
        h = int(min(max(h, 800), 8000))
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=h,
                  deviceScaleFactor=1, mobile=False)
        time.sleep(settle_s)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
