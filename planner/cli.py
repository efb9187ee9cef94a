"""`meshplan` command line: a thin dispatcher.

Each subcommand is a plugin registered under the `meshplan.commands` entry-point group
(see pyproject.toml) as a `register(subparsers)` function, so the planner never imports
the executor or the dashboard: they plug themselves in.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Any

from costmodels.errors import MeshplanError

# Used only when the distribution's metadata is not installed (running from a checkout).
_FALLBACK = {
    "predict": "planner.commands.predict:register",
    "validate": "planner.commands.validate:register",
}


def _load_registrars() -> dict[str, Any]:
    found = {ep.name: ep for ep in entry_points(group="meshplan.commands")}
    if found:
        return found
    from importlib import import_module

    class _EP:
        def __init__(self, target: str) -> None:
            self.target = target

        def load(self) -> Any:
            mod, _, attr = self.target.partition(":")
            return getattr(import_module(mod), attr)

    return {name: _EP(t) for name, t in _FALLBACK.items()}


class _Parser(argparse.ArgumentParser):
    """Argument errors end as one line and exit 2, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_action_command(subparsers: argparse._SubParsersAction, name: str,
                       help: str) -> argparse._SubParsersAction:
    """`meshplan NAME ACTION ...`: registers NAME and returns the subparsers its actions
    (required; `args.NAME_command` holds the one chosen) are added to."""
    p = subparsers.add_parser(name, help=help)
    actions = p.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    actions.required = True
    return actions


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with `command`'s alone when it names one (a
    `meshplan run` rank then never imports the planner's pandas / scipy commands)."""
    registrars = _load_registrars()
    if command in registrars:
        registrars = {command: registrars[command]}
    parser = _Parser(
        prog="meshplan",
        description="Plan, run and calibrate LLM pretraining layouts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for _name, ep in sorted(registrars.items()):
        try:
            register = ep.load()
        except ModuleNotFoundError:
            continue  # a plugin whose package part is not built yet / not installed
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except MeshplanError as exc:
        print(f"meshplan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meshplan: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
