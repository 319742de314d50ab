"""The plugin manager: which plugins load, in what order, and what happens when one breaks.

Loading order: entry points of group ``tk`` (the built-ins first, they are entry points of
this distribution), then ``TK_PLUGINS=mod1,mod2``, then ``--plugin MODULE`` (a module name
or a path to a ``.py`` file). Environment switches (read by :mod:`toolkit.env`):

- ``TK_LOAD_PLUGINS=a,b``: load only these distributions (or entry-point names) besides the
  built-ins; empty means built-ins only.
- ``TK_DISABLE_PLUGINS=a,b``: skip these distributions / entry-point names before import.
- ``TK_STRICT_PLUGINS=1``: any plugin failure or problem is fatal.
- ``TK_PLUGIN_IMPORT_TIMEOUT=S``: give up on a plugin whose import takes longer
  (:mod:`toolkit.plugin.importing`).

Isolation: a plugin that fails to import is recorded (``error``) and the rest keeps
working; a hook that does not fit the contract or raises while registering is left out
alone (a ``problem``), the plugin's other hooks keep working. An exception escaping plugin
code later becomes a :class:`~toolkit.errors.PluginBugError` naming the plugin and its
distribution (:meth:`Plugins.blame`). Nothing here imports torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from toolkit import env as tk_env
from toolkit.errors import PluginBugError, PluginError, TkError, one_line
from toolkit.plugin import hookspecs, importing
from toolkit.plugin.blame import blame
from toolkit.plugin.registry import KINDS, Registry
from toolkit.plugin.validate import inspect_plugin

BUILTIN_DISTRIBUTION = "tk-microtoolkit"
# the hooks that only observe (called through Plugins.notify); objects attached for one run
# (loggers) may implement these and nothing else
OBSERVER_HOOKS = ("tk_train_start", "tk_epoch_end", "tk_model_saved", "tk_train_end")
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
    error: str | None = None  # it did not load at all
    problems: list[str] = field(default_factory=list)  # hooks left out, suspicious names
    obj: Any = field(default=None, repr=False, compare=False)  # the imported module

    @property
    def origin(self) -> str:
        """Where it comes from, for messages: ``tk-plugin-acme 0.3.1`` or ``--plugin x.py``."""
        if self.distribution:
            return f"{self.distribution} {self.version or '?'}".strip()
        return f"{self.source} {self.module}"

    def as_dict(self) -> dict[str, Any]:
        keys = ("name", "module", "distribution", "version", "builtin", "source", "hooks",
                "error", "problems")
        return {k: getattr(self, k) for k in keys}


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


class Plugins:
    """A loaded set of plugins: the pluggy manager, what loaded (or failed) and the
    component registries built from the registration hooks (built on first use)."""

    def __init__(self, strict: bool = False, import_timeout: float = 0.0):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = strict
        self.import_timeout = import_timeout
        self.records: dict[str, PluginRecord] = {}
        self._registries: dict[str, Registry] = {}
        self._reported: set[str] = set()  # plugins whose observer failure was reported
        self._muted: set[str] = set()  # attached observers switched off after a failure
        self._attached: set[str] = set()  # observers attached for one run (loggers)

    # -- loading -----------------------------------------------------------------------
    def _fail(self, record: PluginRecord, what: str, exc: BaseException) -> None:
        """``record`` did not load at all."""
        record.error = f"{what}: {_describe(exc)}"
        if self.strict:
            raise PluginError(f"plugin '{record.name}' failed to {what}: {_describe(exc)}"
                              ) from exc

    def _problem(self, record: PluginRecord, problem: str) -> None:
        """One part of ``record`` is left out; the rest keeps working (unless strict)."""
        if problem not in record.problems:  # registries are built again after a change
            record.problems.append(problem)
        if self.strict:
            raise PluginError(f"plugin '{record.name}': {problem} (TK_STRICT_PLUGINS=1)")

    def _keep(self, record: PluginRecord) -> None:
        """Record a plugin; a second one with a taken name is kept under another key so
        that ``tk plugins`` still shows it (and its error)."""
        key = record.name
        if key in self.records and self.records[key] is not record:
            key = f"{record.name} ({record.module})"
        self.records[key] = record

    def add(self, obj: Any, record: PluginRecord) -> None:
        """Register an imported plugin object under ``record.name``: every hook that fits
        the contract; each one that does not is a problem of the plugin."""
        if any(r.obj is obj for r in self.records.values()):  # installed and --plugin too
            return
        record.obj = obj
        if record.name in self.records and self.records[record.name].error is None:
            self._keep(record)
            first = self.records[record.name]
            self._fail(record, "register", PluginError(
                f"two plugins are named '{record.name}' ({first.module} and {record.module})"
                "; disable one with TK_DISABLE_PLUGINS"))
            return
        self.records[record.name] = record
        found = inspect_plugin(obj, self.pm)
        try:
            self.pm.register(types.SimpleNamespace(**found.fitting), name=record.name)
        except Exception as exc:  # pluggy's own checks (hookwrapper on a firstresult...)
            self._fail(record, "register", exc)
            return
        record.hooks = sorted(h.name for h in self.pm.get_hookcallers(
            self.pm.get_plugin(record.name)) or [])
        self._registries.clear()
        for problem in found.problems:
            self._problem(record, problem)

    def import_module(self, module: str, record: PluginRecord) -> None:
        def slow(seconds: float) -> None:
            limit = (f"tk gives up at {self.import_timeout:g} s" if self.import_timeout
                     else "no time limit")
            print(f"tk: warning: plugin '{record.name}' ({record.origin}) is still importing "
                  f"after {seconds:g} s ({limit}: TK_PLUGIN_IMPORT_TIMEOUT; "
                  f"TK_DISABLE_PLUGINS={record.name} skips it)", file=sys.stderr, flush=True)

        try:
            obj = importing.import_module(module, timeout=self.import_timeout, on_slow=slow)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin may even call sys.exit on import
            self._keep(record)
            if isinstance(exc, importing.ImportTimedOut):
                print(f"tk: warning: plugin '{record.name}' ({record.origin}) skipped: {exc}",
                      file=sys.stderr, flush=True)
            self._fail(record, "import", exc)
            return
        self.add(obj, record)

    # -- components --------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        """The registry of one kind, filled by calling every plugin's registration hook
        with a ``register`` callback that records the plugin as owner. A hook that raises
        contributes nothing (a problem of its plugin); the others are unaffected."""
        if kind not in KINDS:
            raise PluginError(f"unknown component kind '{kind}' (one of: {', '.join(KINDS)})")
        if kind not in self._registries:
            reg = Registry(kind, notes=self.trouble_note)
            self._fill(reg, builtins=True)
            self._registries[kind] = reg
        return self._registries[kind]

    def _fill(self, reg: Registry, builtins: bool) -> None:
        hook = getattr(self.pm.hook, f"tk_register_{reg.kind}")
        for impl in hook.get_hookimpls():  # registration order (built-ins first)
            record = self.records[impl.plugin_name]
            if record.builtin and not builtins:
                continue
            staged: list[tuple[str, Any, dict[str, Any]]] = []

            def register(name: str, factory: Any, _staged: list[Any] = staged,
                         **info: Any) -> None:
                _staged.append((name, factory, info))

            try:
                impl.function(**_kwargs_for(impl, register=register))
            except Exception as exc:
                self._problem(record, f"{hook.name} raised {_describe(exc)}")
                continue
            for name, factory, info in staged:
                try:
                    reg.register(record.name, name, factory, **info)
                except TkError as exc:
                    self._problem(record, str(exc))

    def trouble_note(self) -> str:
        """A hint for "unknown name" errors: plugins that did not load or left parts out."""
        troubled = [r for r in self.records.values() if r.error or r.problems]
        if not troubled:
            return ""
        parts = [f"plugin '{r.name}' ({r.origin}) "
                 + (f"failed to load ({r.error})" if r.error else f"has a problem: "
                    f"{r.problems[0]}") for r in troubled[:2]]
        more = f" and {len(troubled) - 2} more" if len(troubled) > 2 else ""
        return f"; note: {'; '.join(parts)}{more} (see `tk plugins`)"

    def add_commands(self, cli: Any) -> None:
        """Let plugins add commands to the click group ``cli``; a plugin may not replace a
        command that exists already (tk's own or an earlier plugin's): that is reported."""
        for impl in reversed(self.pm.hook.tk_register_commands.get_hookimpls()):
            record = self.records[impl.plugin_name]
            before = dict(getattr(cli, "commands", {}))
            try:
                impl.function(**_kwargs_for(impl, cli=cli))
            except Exception as exc:
                cli.commands.clear()
                cli.commands.update(before)
                self._problem(record, f"tk_register_commands raised {_describe(exc)}")
                continue
            taken = sorted(n for n, c in before.items() if cli.commands.get(n) is not c)
            if taken:
                cli.commands.update({n: before[n] for n in taken})
                self._problem(record, f"command {', '.join(map(repr, taken))} exists "
                                      "already; choose another name")

    def check(self, cli: Any = None) -> None:
        """Run the third-party plugins' registration hooks against scratch registries
        (and their command hooks against a copy of ``cli``) so that ``tk plugins`` can
        show their problems. The real registries are not built: the built-in backbone
        plugins are slow to list."""
        for kind in KINDS:
            self._fill(Registry(kind), builtins=False)
        if cli is not None:
            self.add_commands(type(cli)(cli.name, commands=dict(cli.commands)))

    # -- observers attached for one run (loggers) ---------------------------------------
    def attach(self, obj: Any, name: str, owner: str) -> PluginRecord:
        """Register ``obj``, an object whose ``@hookimpl`` methods observe one run (a
        logger built by plugin ``owner``'s factory), under ``name`` until :meth:`detach`.
        Its failures are blamed on ``owner``'s module and distribution; an attached
        observer that raises is reported once and not called again (:meth:`notify`)."""
        base = self.records.get(owner)
        record = PluginRecord(name=name, module=base.module if base else type(obj).__module__,
                              source=base.source if base else "--log",
                              distribution=base.distribution if base else None,
                              version=base.version if base else None,
                              builtin=bool(base and base.builtin))
        if name in self.records or self.pm.get_plugin(name) is not None:
            raise PluginError(f"an observer named '{name}' is attached already")
        found = inspect_plugin(obj, self.pm)
        for attr in list(found.fitting):
            hook = (self.pm.parse_hookimpl_opts(obj, attr) or {}).get("specname") or attr
            if hook not in OBSERVER_HOOKS:
                del found.fitting[attr]
                found.problems.append(f"{hook} is not an observer hook (an object attached "
                                      f"for a run observes only: {', '.join(OBSERVER_HOOKS)})")
        for problem in found.problems:
            if self.strict:
                raise PluginError(f"{name}: {problem} (TK_STRICT_PLUGINS=1)")
            print(f"tk: warning: {name} ({record.origin}): {problem}", file=sys.stderr)
        self.pm.register(types.SimpleNamespace(**found.fitting), name=name)
        record.obj = obj
        record.hooks = sorted(h.name for h in self.pm.get_hookcallers(
            self.pm.get_plugin(name)) or [])
        self.records[name] = record
        self._attached.add(name)
        return record

    def detach(self, name: str) -> None:
        """Unregister an observer :meth:`attach` registered (nothing if it is not there)."""
        if name not in self._attached:
            return
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.records.pop(name, None)
        self._muted.discard(name)
        self._reported.discard(name)
        self._attached.discard(name)

    # -- calling plugin code -----------------------------------------------------------
    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call an observer hook; an observer that raises is reported in one line naming
        the plugin, never fatal (unless strict: then it is a PluginBugError). Each plugin's
        failures are reported once per process; an observer attached for a run (a
        logger) is switched off for the rest of that run after its first failure, since
        a closed file or an unreachable server would fail, or stall, every later call."""
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            if impl.plugin_name in self._muted:
                continue
            try:
                impl.function(**_kwargs_for(impl, **kwargs))
            except Exception as exc:
                record = self.records[impl.plugin_name]
                if self.strict:
                    raise PluginBugError(record.name, record.origin, exc, hook) from exc
                if record.name in self._attached:
                    self._muted.add(record.name)
                    print(f"tk: warning: logger '{record.name}' ({record.origin}) failed in "
                          f"{hook}: {_describe(exc)}; it is off for the rest of this run "
                          "(training goes on)", file=sys.stderr)
                elif record.name not in self._reported:
                    self._reported.add(record.name)
                    print(f"tk: warning: plugin '{record.name}' ({record.origin}) failed in "
                          f"{hook}: {_describe(exc)}", file=sys.stderr)

    def dataset_for_path(self, path: str) -> str | None:
        """The dataset a plugin claims for ``--data PATH`` (``tk_dataset_for_path``, first
        answer wins, third-party plugins asked before the built-ins), or None."""
        for impl in reversed(self.pm.hook.tk_dataset_for_path.get_hookimpls()):
            record = self.records[impl.plugin_name]
            try:
                answer = impl.function(**_kwargs_for(impl, path=str(path)))
            except TkError:
                raise
            except Exception as exc:
                raise PluginBugError(record.name, record.origin, exc,
                                     f"tk_dataset_for_path({str(path)!r})") from exc
            if answer is not None:
                if not isinstance(answer, str) or not answer:
                    raise PluginBugError(record.name, record.origin, TypeError(
                        f"tk_dataset_for_path returned {answer!r}, not a dataset name"))
                return answer
        return None

    def blame(self, exc: BaseException) -> PluginBugError | None:
        """The plugin whose code raised ``exc``, as a PluginBugError (see
        :func:`toolkit.plugin.blame.blame`), or None."""
        return blame(exc, list(self.records.values()))

    # -- provenance --------------------------------------------------------------------
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


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line, the type module-qualified unless built in; tk's own
    exceptions (a sentence already) as their message only."""
    cls = type(exc)
    if isinstance(exc, (TkError, importing.ImportTimedOut)):
        return one_line(exc)
    name = (cls.__qualname__ if cls.__module__ in ("builtins", "__main__")
            else f"{cls.__module__}.{cls.__qualname__}")
    return f"{name}: {one_line(exc)}" if str(exc) else name


def _kwargs_for(impl: Any, **available: Any) -> dict[str, Any]:
    return {k: v for k, v in available.items() if k in impl.argnames}


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: set[tuple[str, str]] = set()

    def key(ep: importlib.metadata.EntryPoint) -> tuple[int, str, str]:
        dist = _norm(ep.dist.name) if ep.dist else ""
        return (0 if dist == BUILTIN_DISTRIBUTION else 1, dist, ep.name)

    for ep in sorted(eps, key=key):  # built-ins first, then third-party in a stable order
        ident = (ep.name, ep.value)
        if ident not in seen:  # the same dist on sys.path twice
            seen.add(ident)
            yield ep


def load_plugins(
    modules: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> Plugins:
    """A fresh :class:`Plugins` with entry points, ``TK_PLUGINS`` and ``modules`` loaded."""
    env = os.environ if env is None else env
    plugins = Plugins(strict=tk_env.flag("TK_STRICT_PLUGINS", env=env),
                      import_timeout=tk_env.number("TK_PLUGIN_IMPORT_TIMEOUT",
                                                   importing.DEFAULT_TIMEOUT_S, env, minimum=0))
    only = tk_env.names("TK_LOAD_PLUGINS", env)
    only = None if only is None else {_norm(x) for x in only}
    disabled = {_norm(x) for x in tk_env.names("TK_DISABLE_PLUGINS", env) or []}

    for ep in _entry_points():
        dist = ep.dist.name if ep.dist else None
        builtin = dist is not None and _norm(dist) == BUILTIN_DISTRIBUTION
        names = {_norm(ep.name), _norm(dist or "")}
        if names & disabled or (only is not None and not builtin and not names & only):
            continue
        plugins.import_module(ep.value, PluginRecord(
            name=ep.name, module=ep.value, source="entry point", distribution=dist,
            version=ep.dist.version if ep.dist else None, builtin=builtin))

    extra = tk_env.names("TK_PLUGINS", env) or []
    for source, mods in (("TK_PLUGINS", extra), ("--plugin", list(modules))):
        for module in mods:
            name = Path(module).stem if module.endswith(".py") else module
            if _norm(name) not in disabled:
                plugins.import_module(module, PluginRecord(name, module, source))
    return plugins
