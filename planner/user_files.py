"""Reading a file the user named on the command line: a missing file or one that does not
parse is one line naming the flag, the path and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml

from costmodels.errors import MeshplanError


def read_user_file(path: str | Path, flag: str, fix: str, fmt: Literal["json", "yaml"]) -> Any:
    """The parsed contents of `path` (`flag` names where it came from; `fix` says what to
    pass when it is missing)."""
    p = Path(path)
    if not p.is_file():
        raise MeshplanError(f"{flag} {p}: file not found; {fix}")
    try:
        text = p.read_text(encoding="utf-8")
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise MeshplanError(f"{flag} {p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MeshplanError(f"{flag} {p}: not valid {fmt.upper()} ({first})") from None
