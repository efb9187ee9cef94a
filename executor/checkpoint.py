"""Checkpoints: whole or absent, verified on load, resumed from automatically.

Layout of RUN/checkpoints/step_000020/:
  model.pt, optim.pt   tensors (`torch.save`; loaded with `weights_only=True`)
  state.json           everything else as plain JSON: step, tokens seen, data cursor,
                       blacklist, spike-detector state, python / numpy / torch / cuda RNG
  manifest.json        sha256 and size of every other file, written last

A checkpoint is written into `.tmp-step_000020`, the manifest is added, and the folder is
renamed into place (atomic on POSIX), so a crash never leaves a half-written checkpoint
under a final name. Loading walks checkpoints newest first (this run's folder and the
optional mirror) and takes the first whose manifest verifies, warning about the others.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from costmodels.errors import MeshplanError
from executor.data.shards import sha256_file
from planner.atomic import atomic_write_text, fsync_dir

FORMAT = "meshplan-ckpt-v1"
MANIFEST = "manifest.json"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(MeshplanError):
    """A checkpoint that cannot be used (missing, truncated, or failing its checksums)."""


class CheckpointWriteError(CheckpointError, RuntimeError):
    """Saving failed (disk full, unwritable folder); the partial folder was removed. A
    RuntimeError too, as the write failures it replaces were."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as plain JSON."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *[_to_json(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:])
    )
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_json(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_to_json(v) for v in x]
    return x


def _to_tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x


# --------------------------------------------------------------------------- files


def write_single_process(
    directory: Path, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
    extra_state: dict[str, Any],
) -> None:
    """The default (single-process) checkpoint format: two tensor files and a JSON file."""
    torch.save(model_state, directory / "model.pt")
    torch.save(optim_state, directory / "optim.pt")
    (directory / STATE_FILE).write_text(json.dumps(extra_state))


def read_single_process(
    directory: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        model_state = torch.load(directory / "model.pt", map_location=map_location,
                                 weights_only=True)
        optim_state = torch.load(directory / "optim.pt", map_location=map_location,
                                 weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad checkpoint
        raise CheckpointError(f"{directory}: cannot load tensors ({exc})") from None
    return model_state, optim_state


def read_extra_state(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}/{STATE_FILE}: unreadable ({exc})") from None


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, step: int) -> None:
    files = {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in _files_under(directory)
    }
    manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))


def verify_checkpoint(directory: str | Path) -> int:
    """Check a checkpoint against its manifest; returns its step or raises CheckpointError."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{d}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        step = int(manifest["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{path}: corrupt manifest") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} is not {FORMAT}")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: lists no files")
    root = d.resolve()
    for name, info in files.items():
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                or not isinstance(info.get("bytes"), int):
            raise CheckpointError(f"{path}: corrupt manifest (entry {name!r})")
        p = d / name
        if not name or root not in (d / name).resolve().parents:
            raise CheckpointError(f"{path}: entry {name!r} points outside the checkpoint")
        if not p.is_file():
            raise CheckpointError(f"{d}: file {name} is missing")
        if p.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"{d}: file {name} has {p.stat().st_size} bytes, manifest says {info['bytes']} "
                "(truncated)"
            )
        if sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{d}: file {name} fails its sha256 checksum (corrupted)")
    return step


# --------------------------------------------------------------------------- manager


@dataclass
class CheckpointManager:
    """Saves, prunes, mirrors and finds checkpoints of one run."""

    root: Path  # RUN/checkpoints
    keep: int = 3
    mirror: Path | None = None
    warn: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.mirror is not None:
            self.mirror = Path(self.mirror)

    # -- listing
    @staticmethod
    def _step_dirs(root: Path | None) -> list[tuple[int, Path]]:
        if root is None or not root.is_dir():
            return []
        out = []
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def candidates(self) -> list[tuple[int, Path]]:
        """All checkpoints, newest first; on equal steps the run's own before the mirror's."""
        own = [(s, 0, p) for s, p in self._step_dirs(self.root)]
        mir = [(s, 1, p) for s, p in self._step_dirs(self.mirror)]
        return [(s, p) for s, _, p in sorted(own + mir, key=lambda x: (-x[0], x[1]))]

    def latest_valid(self, max_step: int | None = None) -> Path | None:
        """The newest checkpoint (at or before `max_step`) whose manifest verifies; warns
        about every newer one it has to skip."""
        for step, path in self.candidates():
            if max_step is not None and step > max_step:
                continue
            try:
                verify_checkpoint(path)
            except CheckpointError as exc:
                self.warn(f"warning: skipping checkpoint {exc}")
                continue
            return path
        return None

    # -- writing
    def save(
        self, step: int, write: Callable[[Path], None], is_writer: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> Path:
        """`write(tmp_dir)` fills the checkpoint (every rank of a distributed run calls it);
        the writer rank then adds the manifest, renames it into place and prunes."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if is_writer:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_stale_tmp()
            tmp.mkdir()
        barrier()
        try:
            write(tmp)
        except Exception as exc:  # noqa: BLE001 - disk full, permissions: see _write_failed
            raise self._write_failed(step, tmp, exc) from None
        barrier()
        if is_writer:
            try:
                write_manifest(tmp, step)
                if final.exists():  # re-saving a step (after a rollback): replace it whole
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.root)
            except Exception as exc:  # noqa: BLE001
                raise self._write_failed(step, tmp, exc) from None
            if self.mirror is not None:
                try:
                    self._mirror(final)
                except Exception as exc:  # noqa: BLE001 - the primary copy is whole: go on
                    shutil.rmtree(self.mirror / f".tmp-{final.name}", ignore_errors=True)
                    self.warn(f"warning: checkpoint step {step} not mirrored to {self.mirror} "
                              f"({_reason(exc)})")
            self._prune(self.root)
            if self.mirror is not None:
                self._prune(self.mirror)
        barrier()
        return final

    def remove_stale_tmp(self) -> None:
        """Delete temporary folders a crash left behind (never trusted: no final name)."""
        for root in (self.root, self.mirror):
            if root is None or not root.is_dir():
                continue
            for p in root.iterdir():
                if p.name.startswith(".tmp-step_") and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)

    def _write_failed(self, step: int, tmp: Path, exc: BaseException) -> CheckpointWriteError:
        """Drop the partial folder; one line saying why and that the older ones are intact."""
        full = _is_disk_full(exc, self.root)  # before the partial files are freed again
        shutil.rmtree(tmp, ignore_errors=True)
        older = self.latest_step()
        keep = (f"checkpoint step {older} is intact and the same command resumes from it"
                if older is not None else "no earlier checkpoint exists")
        fix = ("free disk space there or lower checkpoint.keep" if full
               else "check that the folder is writable")
        why = os.strerror(errno.ENOSPC) if full else _reason(exc)
        return CheckpointWriteError(
            f"checkpoint step {step} could not be written to {self.root} ({why}); "
            f"{fix}; {keep}"
        )

    def latest_step(self) -> int | None:
        steps = [s for s, _ in self._step_dirs(self.root)]
        return max(steps) if steps else None

    def _mirror(self, src: Path) -> None:
        assert self.mirror is not None
        self.mirror.mkdir(parents=True, exist_ok=True)
        tmp = self.mirror / f".tmp-{src.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        final = self.mirror / src.name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _prune(self, root: Path) -> None:
        for _step, path in self._step_dirs(root)[self.keep:]:
            shutil.rmtree(path, ignore_errors=True)

    def drop_after(self, step: int) -> None:
        """Remove checkpoints newer than `step` (a rollback abandons that future)."""
        for root in (self.root, self.mirror):
            for s, path in self._step_dirs(root):
                if s > step:
                    shutil.rmtree(path, ignore_errors=True)


def _is_disk_full(exc: BaseException, root: Path) -> bool:
    """ENOSPC anywhere in the chain, or torch's stream writer failing on a full disk."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(root).free < (1 << 20)
    except OSError:
        return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


