"""Named components with owners: register, resolve (with did-you-mean), list (fnmatch)."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from toolkit.errors import AmbiguousNameError, TkError, UnknownNameError

KINDS = ("backbones", "heads", "losses", "optimizers", "datasets", "loggers")


@dataclass(frozen=True)
class Component:
    """One registered name: who owns it, how to build it and what it says about itself."""

    kind: str
    name: str
    owner: str
    factory: Callable[..., Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def qualified_name(self) -> str:
        return f"{self.owner}:{self.name}"

    @property
    def fallback(self) -> bool:
        return bool(self.info.get("fallback"))

    @property
    def task(self) -> str:
        """The task a component is for (``task=`` info when registered): ``single-label``
        unless it says ``multi-label`` (losses)."""
        return str(self.info.get("task") or "single-label")

    @property
    def default_lr(self) -> float | None:
        """The learning rate an optimizer asks for when ``--lr`` is not given (None: the
        caller's default)."""
        value = self.info.get("default_lr")
        return None if value is None else float(value)

    def accepted_options(self, positional: int = 0) -> list[str] | None:
        """Keyword options the factory takes after its ``positional`` arguments
        (None: it takes any, through ``**options``)."""
        try:
            params = list(inspect.signature(self.factory).parameters.values())
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return [p.name for p in named[positional:]]

    def check_options(self, options: dict[str, Any], positional: int = 0) -> None:
        """Unknown option names are a user error naming the accepted ones."""
        accepted = self.accepted_options(positional)
        if accepted is None:
            return
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TkError(
                f"{_singular(self.kind)} '{self.name}' has no option "
                f"{', '.join(map(repr, unknown))}"
                + _did_you_mean(unknown[0], accepted)
                + (f" (options: {', '.join(accepted)})" if accepted else " (it takes no options)")
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-able view (no factory)."""
        extra = {k: v for k, v in self.info.items() if k not in ("fallback", "default")}
        if self.info.get("default"):
            extra["default"] = True
        return {"name": self.name, "plugin": self.owner, **extra}


class Registry:
    """All components of one kind (backbones, heads...), each owned by one plugin.

    A bare name registered by two plugins is ambiguous: resolving it is an error naming
    both owners, unless all but one registered it as a ``fallback`` (built-in timm yields
    bare names to torchvision this way). ``owner:name`` always picks one explicitly.
    """

    def __init__(self, kind: str, notes: Callable[[], str] | None = None):
        self.kind = kind
        self._by_name: dict[str, list[Component]] = {}
        self._notes = notes  # appended to "unknown name" errors (plugins that failed)

    @property
    def singular(self) -> str:
        return _singular(self.kind)

    def register(self, owner: str, name: str, factory: Callable[..., Any], **info: Any) -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise TkError(f"plugin '{owner}' registered an invalid {self.singular} name {name!r}")
        if not callable(factory):
            raise TkError(f"plugin '{owner}' registered {self.singular} '{name}' without a factory")
        lr = info.get("default_lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or not math.isfinite(lr) or lr <= 0):
            raise TkError(f"plugin '{owner}' registered {self.singular} '{name}' with "
                          f"default_lr={lr!r}: expected a positive number")
        entries = self._by_name.setdefault(name, [])
        if any(c.owner == owner for c in entries):
            raise TkError(f"plugin '{owner}' registered {self.singular} '{name}' twice")
        entries.append(Component(self.kind, name, owner, factory, dict(info)))

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
        except TkError:
            return False
        return True

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    def _winners(self, name: str) -> list[Component]:
        entries = self._by_name.get(name, [])
        primary = [c for c in entries if not c.fallback]
        return primary or entries

    def conflicts(self) -> dict[str, list[str]]:
        """Bare names that more than one plugin claims (not counting fallbacks)."""
        return {
            name: sorted(c.owner for c in self._winners(name))
            for name in sorted(self._by_name)
            if len(self._winners(name)) > 1
        }

    def resolve(self, name: str) -> Component:
        """``name`` or ``owner:name`` -> the component, or a clear error."""
        if ":" in name:
            owner, _, bare = name.partition(":")
            for c in self._by_name.get(bare, []):
                if c.owner == owner:
                    return c
            owners = sorted({c.owner for cs in self._by_name.values() for c in cs})
            if owner not in owners:
                raise UnknownNameError(
                    f"unknown plugin '{owner}' in {self.singular} '{name}'"
                    + _did_you_mean(owner, owners) + self._note()
                )
            raise UnknownNameError(
                f"plugin '{owner}' has no {self.singular} '{bare}'"
                + _did_you_mean(bare, [c.name for cs in self._by_name.values() for c in cs
                                       if c.owner == owner]) + self._note()
            )
        winners = self._winners(name)
        if len(winners) == 1:
            return winners[0]
        if len(winners) > 1:
            owners = sorted(c.owner for c in winners)
            raise AmbiguousNameError(
                f"{self.singular} '{name}' is registered by several plugins: "
                f"{' and '.join(repr(o) for o in owners)}; pick one with "
                + " or ".join(f"'{o}:{name}'" for o in owners)
            )
        raise UnknownNameError(
            f"unknown {self.singular} '{name}'" + _did_you_mean(name, list(self._by_name))
            + f" (see `tk list {self.kind}`)" + self._note()
        )

    def _note(self) -> str:
        return self._notes() if self._notes is not None else ""

    def list(self, pattern: str | None = None) -> list[Component]:
        """Every registration (all owners), sorted by name then owner; fnmatch ``pattern``
        matches the bare or the qualified name."""
        out = []
        for name in sorted(self._by_name):
            for c in sorted(self._by_name[name], key=lambda c: c.owner):
                if pattern is None or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(
                    c.qualified_name, pattern
                ):
                    out.append(c)
        return out

    def default(self, task: str = "single-label") -> Component:
        """The component a plugin registered with ``default=True`` (what tk uses when the
        user names none: ``--head``, ``--loss``, ``--optimizer``, the dataset without
        ``--data``). An error naming the kind when no loaded plugin offers one (e.g. the
        built-in plugin was disabled) or when several do. ``task``: among the components
        registered for that task (``task="multi-label"`` info; none: single-label)."""
        found = [c for cs in self._by_name.values() for c in cs if c.info.get("default")
                 and c.task == task]
        if not found:
            raise UnknownNameError(
                f"no default {self.singular}: no loaded plugin registers one (is the built-in "
                f"plugin disabled by TK_DISABLE_PLUGINS or TK_LOAD_PLUGINS?); name one "
                f"explicitly (see `tk list {self.kind}`)" + self._note())
        if len(found) > 1:
            names = sorted(c.qualified_name for c in found)
            raise AmbiguousNameError(
                f"several plugins offer a default {self.singular} ({', '.join(names)}); "
                "name one explicitly")
        return found[0]

    def build(self, name: str, *args: Any, **options: Any) -> Any:
        """``resolve(name).factory(*args, **options)``: what a plugin's tests call to build
        one of its components (``registry("backbones").build("mine:net", False)``)."""
        return self.resolve(name).factory(*args, **options)


def _singular(kind: str) -> str:
    """backbones -> backbone, losses -> loss."""
    if kind.endswith("sses"):
        return kind[:-2]
    return kind[:-1] if kind.endswith("s") else kind


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=3)]
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
