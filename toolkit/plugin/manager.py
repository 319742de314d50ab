"""The plugin manager: which plugins load, in what order, and what happens when one breaks.

Loading order: entry points of group ``tk`` (the built-ins first, they are entry points of
this distribution), then ``TK_PLUGINS=mod1,mod2``, then ``--plugin MODULE`` (a module name
or a path to a ``.py`` file). Environment switches:

- ``TK_LOAD_PLUGINS=a,b``: load only these distributions (or entry-point names) besides the
  built-ins; empty means built-ins only.
- ``TK_DISABLE_PLUGINS=a,b``: skip these distributions / entry-point names before import.
- ``TK_STRICT_PLUGINS=1``: a plugin that fails to import or register is fatal.

A plugin that fails is recorded (``tk plugins`` shows the error) and the rest keeps working.
Nothing here imports torch. Use :func:`load_plugins` for a fresh manager (tests do).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from toolkit import env as tk_env
from toolkit.errors import PluginError
from toolkit.plugin import hookspecs
from toolkit.plugin.registry import KINDS, Registry

BUILTIN_DISTRIBUTION = "tk-microtoolkit"
ENTRY_POINT_GROUP = "tk"


@dataclass
class PluginRecord:
    """What ``tk plugins`` shows about one plugin."""

    name: str
    module: str
    source: str  # "entry point", "TK_PLUGINS", "--plugin"
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "source": self.source,
            "hooks": self.hooks,
            "error": self.error,
        }


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _env_list(env: Mapping[str, str], key: str) -> list[str] | None:
    listed = tk_env.names(key, env)
    return None if listed is None else [_norm(x) for x in listed]


class Plugins:
    """A loaded set of plugins: the pluggy manager, what loaded (or failed) and the
    component registries built from the registration hooks (built on first use)."""

    def __init__(self, strict: bool = False):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = strict
        self.records: dict[str, PluginRecord] = {}
        self._registries: dict[str, Registry] = {}

    # -- loading -----------------------------------------------------------------------
    def _fail(self, record: PluginRecord, exc: BaseException, what: str) -> None:
        last = " ".join(traceback.format_exception_only(type(exc), exc)[-1].split())
        record.error = f"{what}: {last}"
        if self.strict:
            raise PluginError(f"plugin '{record.name}' failed to {what}: {last}") from exc

    def _keep(self, record: PluginRecord) -> None:
        """Record a plugin; a second one with a taken name is kept under another key so
        that `tk plugins` still shows it (and its error)."""
        key = record.name
        if key in self.records and self.records[key] is not record:
            key = f"{record.name} ({record.module})"
        self.records[key] = record

    def add(self, obj: Any, record: PluginRecord) -> None:
        """Register an imported plugin object under ``record.name``."""
        if self.pm.is_registered(obj):  # e.g. installed and also given with --plugin
            return
        if record.name in self.records and self.records[record.name].error is None:
            self._keep(record)
            self._fail(record, PluginError(
                f"two plugins are named '{record.name}' ({self.records[record.name].module} "
                f"and {record.module}); disable one with TK_DISABLE_PLUGINS"
            ), "register")
            return
        self.records[record.name] = record
        try:
            self.pm.register(obj, name=record.name)
        except Exception as exc:  # pluggy validation: wrong hook signature, unknown hook
            self._fail(record, exc, "register")
            return
        callers = self.pm.get_hookcallers(obj) or []
        unknown = sorted(h.name for h in callers if not h.has_spec())
        if unknown:  # a misspelt hook would otherwise be silently ignored
            self.pm.unregister(obj)
            known = [h for h in dir(hookspecs) if h.startswith("tk_")]
            hints = [f"{u} (did you mean {close[0]}?)" if close else u for u in unknown
                     for close in [difflib.get_close_matches(u, known, n=1)]]
            self._fail(record, PluginError(f"unknown hook {', '.join(hints)}"), "register")
            return
        record.hooks = sorted(h.name for h in callers)
        self._registries.clear()

    def import_module(self, module: str, record: PluginRecord) -> None:
        try:
            obj = _import(module)
        except BaseException as exc:  # a plugin may even call sys.exit on import
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._keep(record)
            self._fail(record, exc, "import")
            return
        self.add(obj, record)

    # -- components --------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        """The registry of one kind, filled by calling every plugin's registration hook
        with a ``register`` callback that records the plugin as owner."""
        if kind not in KINDS:
            raise PluginError(f"unknown component kind '{kind}' (one of: {', '.join(KINDS)})")
        if kind not in self._registries:
            reg = Registry(kind)
            caller = getattr(self.pm.hook, f"tk_register_{kind}")
            for impl in caller.get_hookimpls():  # registration order (built-ins first)
                owner = self.pm.get_name(impl.plugin) or "?"

                def register(name: str, factory: Any, _owner: str = owner, **info: Any) -> None:
                    reg.register(_owner, name, factory, **info)

                try:
                    impl.function(**_kwargs_for(impl, register=register))
                except Exception as exc:
                    record = self.records.get(owner) or PluginRecord(owner, "?", "?")
                    self._fail(record, exc, f"register {kind}")
            self._registries[kind] = reg
        return self._registries[kind]

    def add_commands(self, cli: Any) -> None:
        """Let plugins add commands to the click group ``cli``; a plugin may not replace a
        command that exists already (tk's own or an earlier plugin's): that is reported."""
        for impl in reversed(self.pm.hook.tk_register_commands.get_hookimpls()):
            owner = self.pm.get_name(impl.plugin) or "?"
            record = self.records.get(owner) or PluginRecord(owner, "?", "?")
            before = dict(getattr(cli, "commands", {}))
            try:
                impl.function(**_kwargs_for(impl, cli=cli))
            except Exception as exc:
                self._fail(record, exc, "register commands")
                continue
            taken = sorted(n for n, c in before.items() if cli.commands.get(n) is not c)
            if taken:
                cli.commands.update({n: before[n] for n in taken})
                self._fail(record, PluginError(
                    f"command {', '.join(map(repr, taken))} exists already; "
                    "choose another name"), "register commands")

    def check(self, cli: Any = None) -> None:
        """Run the registration hooks of the third-party plugins against scratch registries
        (and plugin commands against a copy of ``cli``) so that a failure inside them is
        recorded for ``tk plugins``. The real registries are not built: the built-in
        backbone plugins import torch to list their models."""
        for kind in KINDS:
            for impl in getattr(self.pm.hook, f"tk_register_{kind}").get_hookimpls():
                record = self.records.get(self.pm.get_name(impl.plugin) or "")
                if record is None or record.builtin or record.error:
                    continue
                scratch = Registry(kind)

                def register(name: str, factory: Any, _owner: str = record.name,
                             _reg: Registry = scratch, **info: Any) -> None:
                    _reg.register(_owner, name, factory, **info)

                try:
                    impl.function(**_kwargs_for(impl, register=register))
                except Exception as exc:
                    self._fail(record, exc, f"register {kind}")
        if cli is not None:
            self.add_commands(type(cli)(cli.name, commands=dict(cli.commands)))

    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call an observer hook; an observer that raises is reported, never fatal
        (unless strict)."""
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            try:
                impl.function(**_kwargs_for(impl, **kwargs))
            except Exception as exc:
                owner = self.pm.get_name(impl.plugin) or "?"
                if self.strict:
                    raise PluginError(f"plugin '{owner}' failed in {hook}: {exc}") from exc
                print(f"tk: warning: plugin '{owner}' failed in {hook}: {exc}", file=sys.stderr)

    def dataset_for_path(self, path: str) -> str | None:
        """The dataset a plugin claims for ``--data PATH`` (``tk_dataset_for_path``, first
        answer wins, third-party plugins asked before the built-ins), or None."""
        for impl in reversed(self.pm.hook.tk_dataset_for_path.get_hookimpls()):
            owner = self.pm.get_name(impl.plugin) or "?"
            try:
                answer = impl.function(**_kwargs_for(impl, path=str(path)))
            except Exception as exc:
                raise PluginError(f"plugin '{owner}' failed in tk_dataset_for_path({path!r}): "
                                  f"{type(exc).__name__}: {exc}") from exc
            if answer is not None:
                if not isinstance(answer, str) or not answer:
                    raise PluginError(f"plugin '{owner}' answered tk_dataset_for_path with "
                                      f"{answer!r}, not a dataset name")
                return answer
        return None

    def provenance(self, owner: str) -> dict[str, Any]:
        """Where the plugin ``owner`` comes from: ``{"plugin", "module", "distribution",
        "version"}`` (distribution and version None for a module given by path or
        ``TK_PLUGINS`` outside any installed package)."""
        record = self.records.get(owner)
        if record is None:
            return {"plugin": owner, "module": None, "distribution": None, "version": None}
        return {"plugin": owner, "module": record.module, "distribution": record.distribution,
                "version": record.version}

    def errors(self) -> list[PluginRecord]:
        return [r for r in self.records.values() if r.error]


def _kwargs_for(impl: Any, **available: Any) -> dict[str, Any]:
    return {k: v for k, v in available.items() if k in impl.argnames}


def _import(module: str) -> Any:
    """Import a module by dotted name, or a ``.py`` file by path."""
    path = Path(module)
    if module.endswith(".py") and path.exists():
        name = f"tk_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {module}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: set[tuple[str, str]] = set()
    # built-ins first, then third-party in a stable order
    def key(ep: importlib.metadata.EntryPoint) -> tuple[int, str, str]:
        dist = _norm(ep.dist.name) if ep.dist else ""
        return (0 if dist == BUILTIN_DISTRIBUTION else 1, dist, ep.name)

    for ep in sorted(eps, key=key):
        ident = (ep.name, ep.value)
        if ident not in seen:  # the same dist on sys.path twice
            seen.add(ident)
            yield ep


def load_plugins(
    modules: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> Plugins:
    """A fresh :class:`Plugins` with entry points, ``TK_PLUGINS`` and ``modules`` loaded."""
    env = os.environ if env is None else env
    plugins = Plugins(strict=tk_env.flag("TK_STRICT_PLUGINS", env=env))
    only = _env_list(env, "TK_LOAD_PLUGINS")
    disabled = set(_env_list(env, "TK_DISABLE_PLUGINS") or [])

    for ep in _entry_points():
        dist = ep.dist.name if ep.dist else None
        builtin = dist is not None and _norm(dist) == BUILTIN_DISTRIBUTION
        names = {_norm(ep.name), _norm(dist or "")}
        if names & disabled:
            continue
        if only is not None and not builtin and not names & set(only):
            continue
        record = PluginRecord(
            name=ep.name,
            module=ep.value,
            source="entry point",
            distribution=dist,
            version=ep.dist.version if ep.dist else None,
            builtin=builtin,
        )
        plugins.import_module(ep.value, record)

    extra = tk_env.names("TK_PLUGINS", env) or []
    for source, mods in (("TK_PLUGINS", extra), ("--plugin", list(modules))):
        for module in mods:
            name = Path(module).stem if module.endswith(".py") else module
            if _norm(name) in disabled:
                continue
            plugins.import_module(module, PluginRecord(name=name, module=module, source=source))
    return plugins
