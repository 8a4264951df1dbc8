"""Checks of the patterns' arguments, made where a pattern is built, each naming the argument, what it got and what
is accepted: wrong there, a pattern otherwise failed at its first call in the middle of a run, or quietly decided
wrongly (a str where a list of names belongs was split into letters). Shared by every pattern module."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from hivemesh.mesh.pki import NAME_RE

CAPABILITY_FORM = "[a-z0-9][a-z0-9._-]{0,62}"


def shown(value: object) -> str:
    """value's type and (short) repr, for an error message."""
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def check_capability(value: object, what: str) -> str:
    """value, a capability name, else TypeError (no str) or ValueError (a name no capability can have)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a capability name ({CAPABILITY_FORM}), not {shown(value)}")
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"{what} {value[:80]!r} is not a capability name ({CAPABILITY_FORM})")
    return value


def check_sequence(value: object, what: str, kind: str) -> tuple[object, ...]:
    """value's items as a tuple: any list, tuple or set. One str is refused, not split: tuple("gold") is ("g", "o",
    "l", "d"), and a tier, keyword or capability of one letter matched."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        one = f" (for one, give [{value!r}])" if isinstance(value, str) else ""
        raise TypeError(f"{what} must be a list of {kind}, not {shown(value)}{one}")
    return tuple(value)


def check_str(value: object, what: str) -> str:
    """value, a str (else TypeError)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {shown(value)}")
    return value


def check_names(value: object, what: str, kind: str,
                check: Callable[[object, str], str] = check_str) -> tuple[str, ...]:
    """value, a list of names (see check_sequence), each passed through check."""
    return tuple(check(name, f"{what}[{i}]") for i, name in enumerate(check_sequence(value, what, kind)))


def check_seconds(value: object, what: str) -> float | None:
    """value, a timeout: None (none of its own) or a finite number of seconds > 0. NaN or 0 failed every call."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number of seconds > 0, or None, not {shown(value)}")
    return value


def check_count(value: object, what: str, least: int) -> int:
    """value, an int >= least (a bool or 1.5 is refused: range() or a comparison failed on it mid-run)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what} must be an int >= {least}, not {shown(value)}")
    return value


def check_flag(value: object, what: str) -> bool:
    """value, a bool (a truthy text or object switched a rule on that was meant off, or the reverse)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, not {shown(value)}")
    return value


def check_function(value: object, what: str) -> None:
    """TypeError unless value is None or callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{what} must be a function (or None), not {shown(value)}")


def check_label(value: object, what: str) -> str:
    """value, a non-empty str (a pattern's name, which its memo and note keys begin with)."""
    label = check_str(value, what)
    if not label:
        raise ValueError(f"{what} must be a non-empty str")
    return label
