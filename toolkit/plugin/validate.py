"""Check a plugin object against the contract before it is registered, hook by hook.

pluggy refuses a whole plugin for one bad hook and ignores a hook-like function that lacks
``@hookimpl``. tk instead keeps every hook that fits and reports each one that does not,
with a "did you mean": a misspelt hook name, a parameter the hook does not have, a
function named like a hook but not marked. (Decision: one bad hook costs only itself; the
plugin's other hooks keep working. ``TK_STRICT_PLUGINS=1`` makes any problem fatal.)
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any

import pluggy

from toolkit.plugin import hookspecs


def spec_params() -> dict[str, list[str]]:
    """Every hook of the contract and its parameter names."""
    return {name: list(inspect.signature(f).parameters)
            for name, f in vars(hookspecs).items() if hasattr(f, f"{hookspecs.PROJECT}_spec")}


@dataclass
class Inspection:
    """What :func:`inspect_plugin` found: the hook functions that fit, and the problems."""

    fitting: dict[str, Any] = field(default_factory=dict)  # attribute name -> function
    problems: list[str] = field(default_factory=list)


def inspect_plugin(obj: Any, pm: pluggy.PluginManager) -> Inspection:
    """Sort ``obj``'s public attributes into fitting hook implementations and problems."""
    specs = spec_params()
    found = Inspection()
    for attr in sorted(dir(obj)):
        if attr.startswith("_"):
            continue
        try:
            opts = pm.parse_hookimpl_opts(obj, attr)
            value = getattr(obj, attr)
        except Exception:  # noqa: BLE001 - a property that raises is no hook either
            continue
        if opts is None:
            if callable(value) and _close(attr, specs, cutoff=0.85):
                found.problems.append(f"{attr} is named like a hook but not marked with "
                                      "@hookimpl, so it would never be called")
            continue
        hook = opts.get("specname") or attr
        if hook not in specs:
            found.problems.append(f"{hook} is not a tk hook{_hint(hook, list(specs))}")
            continue
        unknown = [p for p in _required(value) if p not in specs[hook]]
        if unknown:
            hint = _hint(unknown[0], specs[hook], quote="'")
            found.problems.append(f"{hook} has no parameter '{unknown[0]}'{hint} (it takes "
                                  f"{', '.join(specs[hook])})")
            continue
        found.fitting[attr] = value
    return found


def _required(func: Any) -> list[str]:
    """Parameter names without a default (what pluggy passes), ``self`` excluded."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY, p.KEYWORD_ONLY)]


def _close(name: str, candidates: Any, cutoff: float = 0.6) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return close[0] if close else None


def _hint(name: str, candidates: list[str], quote: str = "") -> str:
    close = _close(name, candidates)
    return f" (did you mean {quote}{close}{quote}?)" if close else ""
