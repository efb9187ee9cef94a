"""Dashboard under load: 20 concurrent browser sessions against `meshplan dashboard` on
localhost, each running the default page to completion, in a bounded loop.

    .venv/bin/python benchmarks/dashboard_load.py [--sessions 20] [--rounds 2] [--cold] [--json]

The server is started on a free localhost port (`meshplan dashboard --headless`) and
stopped at the end. Each session is what a browser tab does: GET `/` and
`/_stcore/health`, then open the `/_stcore/stream` websocket, send a `rerun_script` BackMsg
(Streamlit's protocol buffers) and read ForwardMsgs until `script_finished`. One session
runs alone first (`cold_start_s`: the server's first page, which computes the default
search once for every later session); then all sessions run at once, each `--rounds` script
runs (`--cold`: no warm-up, all of them race the cold start). Reported: page load per
session (the GET plus the first script run to `script_finished`), the first run and the
reruns, HTTP latency, and a health probe's latency while the sessions are busy
(responsiveness). Nothing leaves localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 30.0) -> tuple[int, float]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - localhost only
        r.read()
        return r.status, time.perf_counter() - t


def start_server(port: int, timeout: float = 90.0) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "dashboard", "--port", str(port), "--headless",
         "--address", "127.0.0.1"], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dashboard exited with {proc.returncode}")
        try:
            if http_get(f"http://127.0.0.1:{port}/_stcore/health", 2)[0] == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise TimeoutError(f"dashboard not healthy after {timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    from executor.process_group import stop_process_group

    stop_process_group(proc, 15)


async def session(port: int, rounds: int, timeout: float) -> dict:
    """One browser tab: page + health over HTTP, then `rounds` script runs on a websocket."""
    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    loop = asyncio.get_running_loop()
    _, page_s = await loop.run_in_executor(None, http_get, f"http://127.0.0.1:{port}/")
    runs: list[float] = []
    deltas = 0
    async with websockets.connect(f"ws://127.0.0.1:{port}/_stcore/stream",
                                  max_size=None, open_timeout=timeout) as ws:
        for _ in range(rounds):
            msg = BackMsg()
            msg.rerun_script.query_string = ""
            msg.rerun_script.page_script_hash = ""
            t = time.perf_counter()
            await ws.send(msg.SerializeToString())
            while True:
                raw = await asyncio.wait_for(ws.recv(), timeout)
                fwd = ForwardMsg()
                fwd.ParseFromString(raw)
                kind = fwd.WhichOneof("type")
                deltas += kind == "delta"
                if kind == "script_finished":
                    runs.append(time.perf_counter() - t)
                    break
    return {"page_s": page_s, "runs_s": runs, "deltas": deltas}


async def probe(port: int, stop: asyncio.Event) -> list[float]:
    """Health-check latency every 0.25 s while the sessions run."""
    loop = asyncio.get_running_loop()
    out = []
    while not stop.is_set():
        _, s = await loop.run_in_executor(None, http_get,
                                          f"http://127.0.0.1:{port}/_stcore/health")
        out.append(s)
        await asyncio.sleep(0.25)
    return out


async def load(port: int, sessions: int, rounds: int, timeout: float, cold: bool = False) -> dict:
    # One session first, alone: the server's cold start (the default search computed once,
    # then shared from `st.cache_data`); the concurrent sessions then load a warm server, as
    # every tab but the first does. --cold skips it (all sessions race the cold start).
    cold_start = None if cold else (await session(port, 1, timeout))["runs_s"][0]
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(port, stop))
    t = time.perf_counter()
    results = await asyncio.gather(*[session(port, rounds, timeout) for _ in range(sessions)],
                                   return_exceptions=True)
    wall = time.perf_counter() - t
    stop.set()
    health = await prober
    ok = [r for r in results if isinstance(r, dict) and len(r["runs_s"]) == rounds]
    errors = [repr(r)[:200] for r in results if not isinstance(r, dict)]
    first = sorted(r["runs_s"][0] for r in ok)
    # page load: the page GET and the first script run to `script_finished` (rendered)
    page_load = sorted(r["page_s"] + r["runs_s"][0] for r in ok)
    rerun = sorted(x for r in ok for x in r["runs_s"][1:])

    def p(xs: list[float], q: float) -> float | None:
        # Nearest-rank percentile.
        return xs[max(0, min(len(xs) - 1, -(-len(xs) * q // 100) - 1))] if xs else None

    return {
        "sessions": sessions, "rounds": rounds, "completed_sessions": len(ok),
        "errors": errors, "wall_s": wall, "cold_start_s": cold_start,
        "page_load_s": {"p50": p(page_load, 50), "p99": p(page_load, 99)},
        "first_run_s": {"p50": p(first, 50), "p99": p(first, 99), "max": first[-1] if first
                        else None},
        "rerun_s": {"p50": p(rerun, 50), "p99": p(rerun, 99)},
        "page_get_s_p50": statistics.median([r["page_s"] for r in ok]) if ok else None,
        "health_probe_s": {"n": len(health), "p50": p(sorted(health), 50),
                           "max": max(health) if health else None},
        "deltas_per_run": (sum(r["deltas"] for r in ok) / (len(ok) * rounds)) if ok else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=180.0, help="per message, seconds")
    ap.add_argument("--cold", action="store_true",
                    help="no warm-up session: every session races the server's cold start")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    port = free_port()
    server = start_server(port)
    try:
        rep = asyncio.run(load(port, args.sessions, args.rounds, args.timeout, args.cold))
    finally:
        stop_server(server)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(f"{rep['completed_sessions']}/{rep['sessions']} sessions finished {rep['rounds']} "
              f"script runs each in {rep['wall_s']:.1f} s; errors: {len(rep['errors'])}")
        print(f"cold start s: {rep['cold_start_s']}; page load s: {rep['page_load_s']}")
        print(f"first run s: {rep['first_run_s']}; reruns s: {rep['rerun_s']}")
        print(f"health probe under load s: {rep['health_probe_s']}; page GET p50 "
              f"{rep['page_get_s_p50']}")
    return 0 if rep["completed_sessions"] == rep["sessions"] else 1


if __name__ == "__main__":
    sys.exit(main())
