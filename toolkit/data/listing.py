"""Which files `tk infer` and `tk eval` read: directories, files and globs -> image paths.

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
  a link is reported through ``warn`` and skipped, never fatal;
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
from toolkit.errors import TkError

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


def _visible(name: str) -> bool:
    return not name.startswith(".")


def iter_images(inputs: Iterable[str | os.PathLike[str]], *, warn: Warn = warn_stderr
                ) -> Iterator[str]:
    """The image files under ``inputs`` in the documented order (see the module doc).

    Missing inputs raise :class:`TkError` when they are reached; :func:`discover` checks
    them all first."""
    seen_files: set[str] = set()
    seen_dirs: set[tuple[int, int]] = set()

    def emit(path: str) -> Iterator[str]:
        key = os.path.abspath(path)
        if key not in seen_files:
            seen_files.add(key)
            yield path

    def walk(folder: str, ancestors: tuple[tuple[int, int], ...]) -> Iterator[str]:
        try:
            st = os.stat(folder)
        except OSError as exc:
            warn(f"cannot read folder {folder}: {exc.strerror or exc} (skipped)")
            return
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            warn(f"{folder}: symlink loop (skipped)")
            return
        if key in seen_dirs:
            warn(f"{folder}: folder already listed through another path (skipped)")
            return
        seen_dirs.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(((e.name, e) for e in it if _visible(e.name)),
                                 key=lambda t: t[0])
        except OSError as exc:
            warn(f"cannot read folder {folder}: {exc.strerror or exc} (skipped)")
            return
        for name, entry in entries:
            path = os.path.join(folder, name)
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                yield from walk(path, (*ancestors, key))
            elif is_image_path(name):
                # regular files, but also broken links and unreadable entries: they get a
                # row with an error rather than vanishing silently
                try:
                    wanted = entry.is_symlink() or entry.is_file()  # not fifos, sockets...
                except OSError:
                    wanted = True
                if wanted:
                    yield from emit(path)

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
                yield from walk(path, ())
            else:
                yield from emit(path)


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
