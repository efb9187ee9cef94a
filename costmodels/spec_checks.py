"""Validation helpers of the cost model's descriptions: a bad value raises `SpecError`, one
line naming the field and the fix."""

from __future__ import annotations

from costmodels.errors import MeshplanError


class SpecError(MeshplanError):
    """A user-facing specification error: one line naming the field and the fix."""


def require(cond: bool, message: str) -> None:
    if not cond:
        raise SpecError(message)


# Sizes and counts fit the int64 arrays the search and the step-time model vectorise over.
MAX_INT = 2**31 - 1


def positive_int(obj: object, name: str, minimum: int = 1, maximum: int = MAX_INT) -> None:
    value = getattr(obj, name)
    require(
        isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum,
        f"{type(obj).__name__}.{name}={value!r}: must be an integer from {minimum} to {maximum}",
    )


def one_of(obj: object, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    require(
        value in allowed,
        f"{type(obj).__name__}.{name}={value!r}: must be one of {', '.join(allowed)}",
    )
