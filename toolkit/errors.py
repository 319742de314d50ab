"""Every exception tk raises on purpose, and the one function that turns any exception into
the single line the CLI prints (:func:`format_error`).

Three kinds of failure, three exit statuses:

- a :class:`TkError` is something the user can fix (bad option, unknown name, missing
  file): ``tk: error: <message>``, exit 2;
- a :class:`PluginBugError` is an exception that escaped a plugin's code:
  ``tk: plugin error: plugin 'NAME' (DISTRIBUTION VERSION) ...``, exit 1;
- anything else is a bug in tk: ``tk: internal error: <Type>: <message>``, exit 1.

``TK_DEBUG=1`` shows the traceback instead. Nothing here imports more than the standard
library: this is the ground floor every layer (``model_store`` included) may use.
"""

from __future__ import annotations

from collections.abc import Sequence


class TkError(Exception):
    """A problem the user can fix (bad option, unknown name, missing file...).

    The CLI prints ``str(error)`` as a single line on stderr and exits with
    ``exit_code``; no traceback unless ``TK_DEBUG=1``.
    """

    exit_code = 2


class UnknownNameError(TkError):
    """A component name that no plugin registered."""


class AmbiguousNameError(TkError):
    """A component name registered by more than one plugin."""


class PluginError(TkError):
    """A plugin failed to import or register (fatal only with TK_STRICT_PLUGINS=1)."""


class PluginBugError(PluginError):
    """An exception (not a :class:`TkError`) escaped a plugin's code: a bug in that plugin,
    not in the user's input. Names the plugin, where it comes from and what it was doing;
    the original exception is ``__cause__`` (``TK_DEBUG=1`` shows both tracebacks)."""

    exit_code = 1

    def __init__(self, plugin: str, origin: str, exc: BaseException, where: str = ""):
        self.plugin, self.origin, self.original, self.where = plugin, origin, exc, where
        at = f" in {where}" if where else ""
        super().__init__(
            f"plugin '{plugin}' ({origin}) raised {type(exc).__name__}: {one_line(exc)}{at} "
            "(a bug in the plugin, not in your input: report it to its authors; TK_DEBUG=1 "
            "shows the traceback)")


class WeightsNotFoundError(TkError):
    """Pretrained weights were asked for but none of the places a plugin knows had them.

    ``tried`` lists what was actually attempted, in order, each as a short phrase
    (``"the torch hub cache /x/resnet18-f37072fd.pth: not there"``, ``"a download from
    https://...: failed (timed out)"``); :func:`toolkit.model.weights.resolve_pretrained`
    fills it. ``filename`` and ``url`` say what to fetch by hand (``url`` None: nothing can
    be downloaded). The older form ``WeightsNotFoundError(backbone, filename, url,
    looked_in)`` still works; it claims no download.
    """

    def __init__(self, backbone: str, filename: str | None = None, url: str | None = None,
                 looked_in: Sequence[str] = (), *, tried: Sequence[str] = ()):
        self.backbone, self.filename, self.url = backbone, filename, url
        self.looked_in = list(looked_in)
        self.tried = list(tried) or [f"{where}: not there" for where in self.looked_in]
        what = f" ({filename})" if filename else ""
        attempts = "; ".join(self.tried) or "nothing"
        fetch = f"get {filename or 'the file'} from {url}, then run" if url else "run"
        super().__init__(
            f"pretrained weights for '{backbone}'{what} not found: tried {attempts}; {fetch} "
            f"`tk store import-weights {backbone} FILE` (or pass --weights FILE, or "
            "--no-pretrained for random weights)")


class DataError(TkError):
    """Training or inference data that cannot be used as given."""


class StoreError(TkError):
    """A model store problem: missing model, damaged file, failed write."""


def describe_os_error(exc: OSError) -> str:
    """A failed file operation's cause in words (``no space left on device``...): the one
    wording the store, the output writers and the CLI use."""
    import errno

    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno == errno.EFBIG:
        return "file too large (file-size limit reached)"
    return exc.strerror or str(exc)


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` (or an exception's message, else its type name) on one line, blanks
    collapsed, cut to ``limit`` characters with ``...``."""
    line = " ".join(str(text).split())
    if not line and isinstance(text, BaseException):
        line = type(text).__name__
    if limit is not None and len(line) > limit:
        line = line[: max(limit - 3, 0)] + "..."
    return line


def format_error(exc: BaseException) -> tuple[str, int]:
    """The line the CLI prints for ``exc`` and the exit status (see the module docstring).
    Blaming a plugin for a foreign exception is the caller's job (it knows the plugins):
    pass the :class:`PluginBugError` it made."""
    if isinstance(exc, PluginBugError):
        return f"tk: plugin error: {one_line(exc)}", exc.exit_code
    if isinstance(exc, TkError):
        return f"tk: error: {one_line(exc)}", exc.exit_code
    return (f"tk: internal error: {type(exc).__name__}: {one_line(exc)} "
            "(run with TK_DEBUG=1 for the traceback)", 1)
