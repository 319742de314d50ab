"""Which plugin raised an exception: the one whose code is in its traceback.

The CLI calls this for an exception that is not a :class:`~toolkit.errors.TkError`, so
that a bug in a plugin (in a factory, a hook, a command, or an object the plugin returned,
such as a dataset) is reported as one line naming the plugin and its distribution instead
of as a bug in tk. The innermost frame inside a plugin's code wins; a third-party plugin's
code is its whole top-level package, a built-in's its module (the built-ins share the
``plugins`` package).
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Iterable
from typing import Any

from toolkit.errors import PluginBugError

WORKER_TRACEBACK = "Original Traceback (most recent call last):"
WORKER_FRAME = re.compile(r'^  File "(.+)", line (\d+), in (\S+)$', re.M)


def blame(exc: BaseException, records: Iterable[Any]) -> PluginBugError | None:
    """A :class:`PluginBugError` (``exc`` as its cause) naming the plugin among
    ``records`` (:class:`~toolkit.plugin.manager.PluginRecord`) whose code raised ``exc``,
    with the function and ``file:line``; None when no plugin code is in the traceback."""
    roots = code_roots(records)
    frames = []  # (filename, line, function), outermost first
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    # an exception from a DataLoader worker process comes back with the worker's traceback
    # as text: its frames are the innermost ones
    shown = exc
    _, _, worker = str(exc).partition(WORKER_TRACEBACK)
    if worker:
        frames += [(f, int(n), fn) for f, n, fn in WORKER_FRAME.findall(worker)]
        last = worker.strip().splitlines()[-1]  # "ValueError: the original message"
        try:
            shown = type(exc)(last.partition(": ")[2] or last)
        except Exception:  # noqa: BLE001 - an exception type with other arguments
            shown = exc
    hit = None
    for filename, line, function in frames:
        for root, record in roots:
            if filename == root or filename.startswith(root + os.sep):
                rel = os.path.relpath(filename, os.path.dirname(root))
                hit = (record, f"{function} ({rel}:{line})")
    if hit is None:
        return None
    bug = PluginBugError(hit[0].name, hit[0].origin, shown, hit[1])
    bug.__cause__ = exc
    return bug


def code_roots(records: Iterable[Any]) -> list[tuple[str, Any]]:
    """``(file or folder, record)`` for every loaded plugin."""
    roots = []
    for record in records:
        if record.obj is None:
            continue
        module = record.obj if isinstance(record.obj, types.ModuleType) else (
            sys.modules.get(type(record.obj).__module__))
        if module is None:
            continue
        if not record.builtin:
            module = sys.modules.get(module.__name__.partition(".")[0], module)
        paths = list(getattr(module, "__path__", None) or [])
        if not paths and getattr(module, "__file__", None):
            paths = [module.__file__]
        roots += [(os.path.normpath(p), record) for p in paths]
    return roots
