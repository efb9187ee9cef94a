"""`meshplan dashboard --port P --headless`: serve the Streamlit app until stopped."""

from __future__ import annotations

import argparse
import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

from costmodels.errors import MeshplanError

MAIN = Path(__file__).resolve().parent / "main.py"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dashboard", help="open the what-if planning dashboard (Streamlit) in a browser",
        description="Serve the meshplan dashboard: Plan, Compare, Size, Data, Schedule, Runs "
                    "and Accuracy pages. Stop it with Ctrl-C.",
    )
    p.add_argument("--port", type=int, default=8501, help="TCP port (default 8501)")
    p.add_argument("--address", default="localhost",
                   help="interface to listen on (default localhost; 0.0.0.0 for all)")
    p.add_argument("--headless", action="store_true",
                   help="do not open a browser (servers, CI, SSH sessions)")
    p.set_defaults(func=run)


def streamlit_command(port: int, headless: bool, address: str = "localhost") -> list[str]:
    if not 1 <= port <= 65535:
        raise MeshplanError(f"--port={port}: must be in 1..65535")
    return [
        sys.executable, "-m", "streamlit", "run", str(MAIN),
        "--server.port", str(port), "--server.headless", "true" if headless else "false",
        "--server.address", address, "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none", "--global.developmentMode", "false",
        # Streamlit's default full gc.collect(2) after every script run holds the GIL for
        # every session: under 20 concurrent sessions it was half the server's CPU
        # (py-spy, benchmarks/dashboard_load.py). Python's own generational GC still runs.
        "--runner.postScriptGC", "false",
    ]


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("plotly") is None:
        raise MeshplanError("dashboard: streamlit and plotly are not installed; "
                            "run `pip install 'meshplan[dashboard]'`")
    cmd = streamlit_command(args.port, args.headless, args.address)
    proc = subprocess.Popen(cmd)
    # Stopping `meshplan dashboard` (SIGTERM) stops the server too: no orphaned Streamlit.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
