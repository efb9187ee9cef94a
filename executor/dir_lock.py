"""One writer per output directory: an advisory `fcntl.flock` on a lock file that names its
holder (host, pid, start time, command).

`meshplan run` takes it on the run directory before it writes anything (the launcher holds it
for all its local ranks; under an external launcher only global rank 0 takes it),
`calibrate --local-loop` on its workdir, `data prepare` beside its output folder (that folder
appears whole, by rename). A second writer exits 2 with one line naming the holder. The
kernel drops a flock when its process dies, so a lock file whose holder is gone is simply
taken again, with a warning that names the dead holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from costmodels.errors import MeshplanError

LOCK_NAME = ".meshplan.lock"
# Set by the process that holds a run directory's lock for the processes it starts (the local
# torchrun launcher for its ranks): they write under its lock and take none of their own.
HELD_ENV = "MESHPLAN_DIR_LOCK_HELD"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        when = "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {when}"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class DirLock:
    """The exclusive lock on `path` (a lock file), held from `acquire` to `release`."""

    def __init__(self, path: Path, field: str, shown: Path) -> None:
        self.path = path
        self.field = field  # the user's flag for the directory, for the error line
        self.shown = shown  # the directory as the user named it
        self._fd: int | None = None

    def fileno(self) -> int:
        assert self._fd is not None, "not held"
        return self._fd

    def acquire(self) -> DirLock:
        where = f"{self.field} {self.shown}"
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise MeshplanError(f"{where}: {self.path.parent} is not a folder; pass a folder path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MeshplanError(f"{where}: cannot create the lock file {self.path} "
                                f"({exc.strerror}); choose a writable {self.field}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(fd) from None
        except OSError as exc:  # a filesystem without flock support
            os.close(fd)
            raise MeshplanError(f"{where}: cannot lock {self.path} ({exc.strerror}); use a "
                                f"{self.field} on a filesystem with flock support") from None
        left = _read_holder(fd)
        if left.get("pid") is not None:  # its holder ended without releasing it: it died
            here = left.get("host") == socket.gethostname()
            pid = left["pid"]
            gone = here and isinstance(pid, int) and 0 < pid < 2**31 and not _pid_alive(pid)
            print(f"meshplan: warning: {where}: taking over the lock left by "
                  f"{_describe(left)} ({'gone' if gone else 'no longer holding it'})",
                  file=sys.stderr)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _in_use(self, fd: int) -> MeshplanError:
        holder = _read_holder(fd)
        os.close(fd)
        return MeshplanError(
            f"{self.field} {self.shown}: in use by meshplan {_describe(holder)} (lock {self.path}); "
            f"wait for it to finish or choose another {self.field}"
        )

    def refuse_if_held(self) -> None:
        """Exit now, before the slow checks and imports that come before `acquire`, when
        another writer holds the lock; creates nothing (`acquire` still decides)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return  # no lock file yet (or not readable): `acquire` reports it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(fd) from None
        except OSError:
            pass
        os.close(fd)  # closing drops the probe's flock

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def dir_lock(directory: str | Path, field: str) -> DirLock:
    """The lock of an output directory, kept inside it (`LOCK_NAME`)."""
    return DirLock(Path(directory) / LOCK_NAME, field, Path(directory))


def sibling_lock(target: str | Path, field: str) -> DirLock:
    """The lock of a folder that appears whole by rename, kept beside it."""
    t = Path(target).resolve()
    return DirLock(t.parent / f".{t.name or 'root'}{LOCK_NAME}", field, Path(target))


def run_dir_lock(directory: str | Path) -> contextlib.AbstractContextManager:
    """`meshplan run`'s lock on `--out`: taken by the launcher or by global rank 0, unless
    the process that started this one holds it already (`HELD_ENV`)."""
    held = os.environ.get(HELD_ENV)
    if held and Path(held).resolve() == Path(directory).resolve():
        return contextlib.nullcontext()
    if "LOCAL_RANK" in os.environ and os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()  # a rank of an external launch: global rank 0 locks
    return dir_lock(directory, "--out")


def refuse_if_run_dir_held(directory: str | Path) -> None:
    """Exit now when another run holds `--out` (`DirLock.refuse_if_held`), unless this process
    writes under a lock its launcher holds."""
    lock = run_dir_lock(directory)
    if isinstance(lock, DirLock):
        lock.refuse_if_held()
