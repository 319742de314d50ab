"""Which files tk reads: the one folder walker (:class:`Walker`) behind `tk infer`'s
discovery of directories, files and globs, `tk eval`'s class folders and the built-in
``imagefolder`` dataset.

Rules (the documented behaviour of `tk infer PATH...`):

- inputs are handled in the order given; a directory is walked recursively, its entries
  sorted by name at every level (so the order is the same on every run and machine);
- inside directories only names ending in an image extension count (case-insensitive:
  :data:`toolkit.data.decode.IMAGE_EXTENSIONS`); hidden entries (``.name``, e.g. macOS ``._x.jpg``
  companions) are skipped; a file named explicitly is always taken, whatever its name;
- an argument that does not exist but holds ``*``, ``?`` or ``[`` is a glob (``**`` spans
  folders), expanded in sorted order; no match, or a plain path that does not exist, is a
  user error (:class:`~toolkit.errors.TkError`, exit 2) raised before any work;
- a folder that cannot be read, a symlink loop, or a folder reached a second time through
  a link is reported through ``warn`` and skipped, never fatal; FIFOs, sockets and devices
  with an image name, hidden folders and hidden image files are skipped and said so in one
  line at the end;
- every file appears once, even when two arguments cover it (compared by absolute path).

Paths are kept in a :class:`PathList`: one byte buffer plus an offset array, so that 100k
paths cost a few MB and DataLoader workers forked from the process do not copy them page by
page (Python string objects would be touched by reference counting).
"""

from __future__ import annotations

import glob
import os
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import overload

from toolkit.data.decode import is_image_path
from toolkit.errors import DataError, TkError

Warn = Callable[[str], None]

_GLOB_CHARS = ("*", "?", "[")


def warn_stderr(message: str) -> None:
    """The default ``warn``: one ``tk: warning: ...`` line on stderr."""
    print(f"tk: warning: {message}", file=sys.stderr, flush=True)


class PathList(Sequence[str]):
    """A compact, picklable, append-only list of file paths."""

    def __init__(self, paths: Iterable[str] = ()):
        self._buf = bytearray()
        self._ends = array("q")
        for p in paths:
            self.append(p)

    def append(self, path: str | os.PathLike[str]) -> None:
        self._buf += os.fsencode(os.fspath(path))
        self._ends.append(len(self._buf))

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._ends)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("PathList index out of range")
        start = self._ends[i - 1] if i else 0
        return os.fsdecode(bytes(self._buf[start : self._ends[i]]))

    def __iter__(self) -> Iterator[str]:
        start = 0
        for end in self._ends:
            yield os.fsdecode(bytes(self._buf[start:end]))
            start = end

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"


def _is_glob(arg: str) -> bool:
    return any(c in arg for c in _GLOB_CHARS)


def visible(name: str) -> bool:
    """Whether a folder entry is listed: names starting with ``.`` are hidden (``.git``,
    macOS ``._x.jpg`` companions, a folder named ``...``)."""
    return not name.startswith(".")


class Walker:
    """The one folder walker of tk (`tk infer` discovery, `tk eval`'s class folders, the
    ``imagefolder`` dataset).

    :meth:`images` yields the image files under a folder: recursively, entries sorted by
    name at every level, names ending in an image extension only (any case), hidden
    entries skipped, symlinked folders followed once (a loop, or a folder reached again
    through another link, is reported through ``warn`` and skipped). Broken links and
    entries that cannot be examined are yielded (reading them gives the error); FIFOs,
    sockets and devices are not. A folder that cannot be read goes to ``unreadable``
    (default: reported through ``warn`` and skipped; a dataset raises instead). What was
    skipped is said once, by :meth:`report`: hidden folders and hidden image files, and
    entries that are not regular files.

    One walker remembers the folders it listed, so several calls share the loop and
    duplicate detection.
    """

    def __init__(self, *, warn: Warn = warn_stderr,
                 unreadable: Callable[[str, OSError], None] | None = None):
        self.warn = warn
        self.unreadable = unreadable
        self.seen_dirs: set[tuple[int, int]] = set()
        self.hidden: list[str] = []
        self.special: list[tuple[str, str]] = []  # (path, kind)

    def _cannot_read(self, folder: str, exc: OSError) -> None:
        if self.unreadable is not None:
            self.unreadable(folder, exc)
            return
        self.warn(f"cannot read folder {folder}: {exc.strerror or exc} (skipped)")

    def images(self, folder: str | os.PathLike[str]) -> Iterator[str]:
        """The image files under ``folder`` (see the class doc)."""
        yield from self._walk(os.fspath(folder), ())

    def _walk(self, folder: str, ancestors: tuple[tuple[int, int], ...]) -> Iterator[str]:
        try:
            st = os.stat(folder)
        except OSError as exc:
            self._cannot_read(folder, exc)
            return
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            self.warn(f"{folder}: symlink loop (skipped)")
            return
        if key in self.seen_dirs:
            self.warn(f"{folder}: folder already listed through another path (skipped)")
            return
        self.seen_dirs.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(((e.name, e) for e in it), key=lambda t: t[0])
        except OSError as exc:
            self._cannot_read(folder, exc)
            return
        for name, entry in entries:
            path = os.path.join(folder, name)
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if not visible(name):
                if is_dir or is_image_path(name):
                    self.hidden.append(path)
                continue
            if is_dir:
                yield from self._walk(path, (*ancestors, key))
            elif is_image_path(name):
                kind = _special_kind(entry)
                if kind is None:
                    yield path
                else:
                    self.special.append((path, kind))

    def report(self) -> None:
        """Say once, through ``warn``, what the walk skipped (then forget it)."""
        if self.special:
            kinds = sorted({k for _, k in self.special})
            self.warn(f"skipped {_count(len(self.special), 'entry', 'entries')} that "
                      f"{'is' if len(self.special) == 1 else 'are'} not a regular file "
                      f"({', '.join(kinds)}): {_examples([p for p, _ in self.special])}")
        if self.hidden:
            self.warn(f"skipped {_count(len(self.hidden), 'hidden entry', 'hidden entries')} "
                      f"(names starting with '.'; name a file to read it): "
                      f"{_examples(self.hidden)}")
        self.special, self.hidden = [], []


def _special_kind(entry: os.DirEntry[str]) -> str | None:
    """``None`` for what gets a row (regular files, broken links, entries that cannot be
    examined), else the kind of special file (FIFO, socket, device)."""
    import stat

    try:
        if entry.is_file():  # follows symlinks
            return None
        st = entry.stat()  # follows symlinks; fails for a broken link
    except OSError:
        return None
    mode = st.st_mode
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _examples(paths: list[str], shown: int = 3) -> str:
    text = ", ".join(paths[:shown])
    return text + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def list_images(folder: str | os.PathLike[str], *, warn: Warn = warn_stderr,
                unreadable: Callable[[str, OSError], None] | None = None) -> list[str]:
    """The image files under ``folder`` (:meth:`Walker.images`), then the report of what
    was skipped."""
    walker = Walker(warn=warn, unreadable=unreadable)
    found = list(walker.images(folder))
    walker.report()
    return found


def class_folders(root: str | os.PathLike[str]) -> list[str]:
    """The names of the visible sub-folders of ``root`` (links followed), sorted: the
    classes of a class-per-sub-folder tree. Raises :class:`DataError` when ``root`` cannot
    be read."""
    try:
        with os.scandir(root) as it:
            names = []
            for e in it:
                try:
                    if visible(e.name) and e.is_dir():
                        names.append(e.name)
                except OSError:
                    continue
    except OSError as exc:
        raise DataError(f"cannot read folder {os.fspath(root)}: {exc.strerror or exc}") \
            from None
    return sorted(names)


def iter_images(inputs: Iterable[str | os.PathLike[str]], *, warn: Warn = warn_stderr,
                walker: Walker | None = None) -> Iterator[str]:
    """The image files under ``inputs`` in the documented order (see the module doc).

    Missing inputs raise :class:`TkError` when they are reached; :func:`discover` checks
    them all first. What was skipped is reported at the end."""
    walker = walker or Walker(warn=warn)
    seen_files: set[str] = set()

    def emit(path: str) -> Iterator[str]:
        key = os.path.abspath(path)
        if key not in seen_files:
            seen_files.add(key)
            yield path

    for raw in inputs:
        arg = os.fspath(raw)
        if os.path.lexists(arg):
            matches = [arg]
        elif _is_glob(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise TkError(f"{arg}: no file matches this pattern")
        else:
            raise TkError(f"{arg}: no such file or directory")
        for path in matches:
            if os.path.isdir(path):
                for found in walker.images(path):
                    yield from emit(found)
            else:
                yield from emit(path)
    walker.report()


def check_inputs(inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Raise :class:`TkError` for the first input that neither exists nor matches a glob."""
    if not inputs:
        raise TkError("no input given: name image files, folders or glob patterns")
    for raw in inputs:
        arg = os.fspath(raw)
        if os.path.lexists(arg):
            continue
        if _is_glob(arg):
            if not glob.glob(arg, recursive=True):
                raise TkError(f"{arg}: no file matches this pattern")
            continue
        raise TkError(f"{arg}: no such file or directory")


def discover(inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], *,
             warn: Warn = warn_stderr) -> PathList:
    """All image files under ``inputs`` (files, folders, globs) as a :class:`PathList`.

    Raises :class:`TkError` (before listing anything) when an input is missing."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    check_inputs(inputs)
    return PathList(iter_images(inputs, warn=warn))
