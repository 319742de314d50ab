"""The one reader of tk's environment switches (``TK_DEBUG``, ``TK_STRICT_PLUGINS``...).

Every flag is read the same way: ``1/true/yes/on`` are on, ``0/false/no/off`` and the empty
string are off (any case, surrounding blanks ignored); anything else is a user error naming
the variable. Numbers and lists likewise give one clear line when malformed. Nothing here
imports more than the standard library.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from toolkit.errors import TkError

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off", ""})


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def flag(name: str, default: bool = False, env: Mapping[str, str] | None = None) -> bool:
    """The boolean switch ``name`` (``default`` when unset)."""
    raw = _env(env).get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise TkError(f"{name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def flag_quietly(name: str, default: bool = False,
                 env: Mapping[str, str] | None = None) -> bool:
    """:func:`flag` for places that must not fail (error reporting itself): a malformed
    value counts as on, so that e.g. ``TK_DEBUG=maybe`` still shows tracebacks."""
    try:
        return flag(name, default, env)
    except TkError:
        return True


def integer(name: str, default: int, env: Mapping[str, str] | None = None, *,
            minimum: int | None = None) -> int:
    """The whole number ``name`` (``_`` allowed as a separator; ``default`` when unset or
    empty)."""
    raw = _env(env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise TkError(f"{name}={raw!r}: expected a whole number") from None
    if minimum is not None and value < minimum:
        raise TkError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def number(name: str, default: float, env: Mapping[str, str] | None = None, *,
           minimum: float | None = None) -> float:
    """The number ``name`` (``default`` when unset or empty)."""
    raw = _env(env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise TkError(f"{name}={raw!r}: expected a number") from None
    if value != value or (minimum is not None and value < minimum):  # NaN, or too small
        raise TkError(f"{name}={raw!r}: must be a number of at least {minimum}")
    return value


def names(name: str, env: Mapping[str, str] | None = None) -> list[str] | None:
    """A comma-separated list (``None`` when unset; ``[]`` when set but empty)."""
    raw = _env(env).get(name)
    if raw is None:
        return None
    return [x.strip() for x in raw.split(",") if x.strip()]


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; else all of the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
