"""Which calibration profile prices a plan, and where it came from: the shipped one, a file
(`--profile`), or the shipped one with this machine's `meshplan bench` measurements merged
in ($MESHPLAN_MACHINE_PROFILE, else $XDG_CACHE_HOME/meshplan/machine.yaml). The cost model
itself only takes the `Profile` it is given; the files and the environment are read here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from costmodels.errors import MeshplanError
from costmodels.profile import Profile, parse_hardware, shipped_profile
from planner.user_files import read_user_file

MACHINE_PROFILE_ENV = "MESHPLAN_MACHINE_PROFILE"


@dataclass(frozen=True)
class PricedBy:
    """Where a profile came from: `shipped`, `file` (its path), `machine` (the shipped
    profile with this machine's measured hardware from `path`) or `plan` (the profile a plan
    file at `path` carries; `origin` says where that one came from)."""

    kind: Literal["shipped", "file", "machine", "plan"]
    path: str | None = None
    origin: str | None = None

    def describe(self) -> str:
        if self.kind == "shipped":
            return "shipped profile (costmodels/profiles/default.yaml)"
        if self.kind == "file":
            return f"profile file {self.path}"
        if self.kind == "plan":
            return f"the profile stored in {self.path}" + (f" ({self.origin})" if self.origin else "")
        return f"shipped profile + this machine's measured hardware ({self.path})"

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "path": self.path, "describe": self.describe()}


def machine_profile_path() -> Path:
    """Where `meshplan bench` keeps what it measured on this machine."""
    env = os.environ.get(MACHINE_PROFILE_ENV)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "meshplan" / "machine.yaml"


def machine_hardware() -> dict[str, dict[str, float]]:
    """The hardware entries measured on this machine ({} if `meshplan bench` never ran)."""
    p = machine_profile_path()
    if not p.is_file():
        return {}
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("hardware"), dict):
        raise MeshplanError(f"{p}: not a machine profile; rerun `meshplan bench` or delete the file")
    return parse_hardware(data["hardware"], str(p))


def profile_file(path: str | Path) -> Profile:
    """A profile YAML written by `meshplan calibrate` / `bench --out`."""
    data = read_user_file(path, "--profile", "create one with `meshplan calibrate`", "yaml")
    return Profile.from_dict(data, str(path))


def resolve_profile(path: str | Path | None = None, machine: bool = True) -> tuple[Profile, PricedBy]:
    """The profile at `path`; without one, the shipped profile, with what `meshplan bench`
    measured here replacing the catalog's figures for those accelerators (`machine=False`:
    the shipped profile exactly)."""
    if path is not None:
        return profile_file(path), PricedBy("file", str(path))
    prof = shipped_profile()
    measured = machine_hardware() if machine else {}
    if not measured:
        return prof, PricedBy("shipped")
    where = str(machine_profile_path())
    prof = prof.with_(hardware={**prof.hardware, **measured},
                      source=f"{prof.source}; hardware measured here ({where})")
    return prof, PricedBy("machine", where)


def load_profile(path: str | Path | None = None, machine: bool = True) -> Profile:
    """`resolve_profile` without the provenance."""
    return resolve_profile(path, machine)[0]
