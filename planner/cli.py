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


def one_line(message: str) -> str:
    """`message` with its control characters (a user's "\\r" or tab inside a key it quotes)
    written as escapes, so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _bounded_int(text: str) -> int:
    """`type=int` for every flag: an integer within int32, the largest count any flag means
    (`costmodels.spec_checks.MAX_INT`); beyond it numpy and torch overflow."""
    from costmodels.spec_checks import MAX_INT

    value = int(text)
    if abs(value) > MAX_INT:
        raise argparse.ArgumentTypeError(f"{text} is out of range (at most {MAX_INT})")
    return value


class _Parser(argparse.ArgumentParser):
    """Argument errors end as one line and exit 2, like every other user error; integer
    flags are bounded (`_bounded_int`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", int, _bounded_int)

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # `--flag=--`: argparse drops the "--" and hands the flag an empty list
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected a value, not '--'")
        return super()._get_values(action, arg_strings)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


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
        print(f"meshplan: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meshplan: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
