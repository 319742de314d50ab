"""Import a plugin module without letting it hang tk.

A plugin module runs arbitrary code when imported; one that sleeps, waits on the network
or deadlocks would hang every command that loads plugins (``tk --help`` lists plugin
commands, so it loads them too). tk bounds the wait:

- after :data:`SLOW_S` seconds (or half the limit) a watchdog thread prints one line
  naming the plugin (a thread can report, but it cannot stop an import running in another
  thread);
- after ``TK_PLUGIN_IMPORT_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT_S`, ``0`` =
  no limit) a ``SIGALRM`` timer raises :class:`ImportTimedOut` inside the import, in the
  main thread, where the import runs. Python retries interrupted system calls after
  running signal handlers (PEP 475), so sleeping, reading a socket or waiting on a lock
  all end there; only C code that never returns to the interpreter cannot be stopped.
  The plugin is then recorded as failed, like one that raised on import.

Why not import in a worker thread and stop waiting for it? The abandoned import would go
on running inside tk (and holding the import lock of the modules it touches), and modules
that install signal handlers at import time fail outside the main thread. Where there is
no ``SIGALRM`` (Windows) or tk does not run in the main thread, only the watchdog's line
is given.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 30.0
SLOW_S = 5.0


class ImportTimedOut(BaseException):  # noqa: N818
    """Raised inside a plugin's import when it exceeds the time limit (a BaseException, so
    that a plugin's ``except Exception`` does not swallow it)."""


def import_module(module: str, *, timeout: float, on_slow: Callable[[float], None]) -> Any:
    """Import ``module`` (a dotted name, or a path to a ``.py`` file) within ``timeout``
    seconds (0: no limit); ``on_slow(seconds)`` is called from a watchdog thread when the
    import is still running after :data:`SLOW_S` seconds (or half the limit, if less)."""
    slow = min(SLOW_S, timeout / 2) if timeout else SLOW_S
    watchdog = threading.Timer(slow, on_slow, args=(slow,))
    watchdog.daemon = True
    watchdog.start()
    try:
        with _time_limit(timeout, module):
            return _import(module)
    finally:
        watchdog.cancel()


@contextlib.contextmanager
def _time_limit(seconds: float, module: str) -> Iterator[None]:
    usable = (seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise ImportTimedOut(f"import of {module} did not finish within {seconds:g} s "
                             "(TK_PLUGIN_IMPORT_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _import(module: str) -> Any:
    """Import a module by dotted name, or a ``.py`` file by path (as ``tk_plugin_STEM``)."""
    path = Path(module)
    if module.endswith(".py") and path.exists():
        name = f"tk_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {module}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return mod
    return importlib.import_module(module)
