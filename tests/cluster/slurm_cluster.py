"""A one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd from the
system's packages (Debian's `slurmctld slurmd slurm-client munge`), every file in a temporary
directory, daemons on free ports, stopped by pid afterwards. Nothing is installed here."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue")


def missing() -> str | None:
    """Why the cluster cannot start here, or None."""
    gone = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None]
    if gone:
        return (f"{', '.join(gone)} not installed (apt-get install slurmctld slurmd slurm-client "
                "munge; .ci/run does)")
    if os.geteuid() != 0:
        return "the localhost SLURM runs its daemons as root (SlurmUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    # -------------------------------------------------------------- start / stop
    def start(self) -> SlurmCluster:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = r / "munge" / "munge.socket"
        self._daemon("munged", ["munged", "-f", f"--socket={sock}", f"--key-file={key}",
                                f"--pid-file={r / 'munge' / 'munged.pid'}",
                                f"--log-file={r / 'log' / 'munged.log'}",
                                f"--seed-file={r / 'munge' / 'munged.seed'}"],
                     r / "munge" / "munged.pid")
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 2
        self.conf.write_text("\n".join([
            "ClusterName=meshplan-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            f"AuthInfo=socket={sock}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "ReturnToService=2", "MinJobAge=600",
            "JobRequeue=1", "KillWait=5", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]) + "\n")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf), "-i"], r / "slurmctld.pid")
        self._daemon("slurmd", ["slurmd", "-f", str(self.conf)], r / "slurmd.pid")
        self._wait_idle()
        return self

    def _daemon(self, name: str, argv: list[str], pidfile: Path) -> None:
        subprocess.run(argv, env=self.env or os.environ, check=True, capture_output=True, timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline:
            if pidfile.is_file() and pidfile.read_text().strip():
                self.pids[name] = int(pidfile.read_text().split()[0])
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not write {pidfile}; see {self.root / 'log'}")

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() if shutil.which(
                "sinfo") else self.run("scontrol", "show", "nodes", check=False).stdout
            if "idle" in out.lower():
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node never became idle ({out!r}); see {self.root / 'log'}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # -------------------------------------------------------------- jobs
    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        m = re.search(r"JobState=(\S+)", out)
        return m.group(1) if m else "UNKNOWN"

    def wait(self, job_id: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED",
                                                            "TIMEOUT", "NODE_FAIL"),
             timeout: float = 300) -> str:
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
