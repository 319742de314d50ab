"""Reading files without trusting what is at the path: only regular files are opened.

A FIFO, a device or a directory where a store file is expected would make a plain ``open``
block forever or read without end. :func:`open_regular` looks first (``stat``, through
links: a symlinked model is fine) and then opens non-blocking and checks the descriptor
again (``fstat``), so neither a swapped-in FIFO nor a device is ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from toolkit.errors import StoreError

_CHUNK = 1 << 20


class NotRegularFileError(StoreError):
    """A path that is not a regular file where one is expected (FIFO, device, directory)."""

    def __init__(self, path: str | os.PathLike[str], kind: str):
        self.path, self.kind = Path(path), kind
        self.strerror = f"not a regular file ({kind})"
        super().__init__(f"{path} is not a regular file ({kind})")


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a file"


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """``open(path, "rb")`` for a regular file (links followed); anything else raises
    :class:`NotRegularFileError` without blocking; a missing path raises
    :class:`FileNotFoundError` as ``open`` would."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, file_kind(st.st_mode))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between stat and open
            raise NotRegularFileError(path, file_kind(st.st_mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        fh = open(fd, "rb")  # noqa: SIM115 - closed by the with below
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def is_regular(path: str | os.PathLike[str]) -> bool:
    """True for a regular file (links followed); never opens anything."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The whole content of a regular file."""
    with open_regular(path) as fh:
        return fh.read()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a regular file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def freed_by_unlink(path: str | os.PathLike[str]) -> int:
    """Bytes that unlinking ``path`` gives back: a regular file's size when this is its
    last link, else 0 (a symlink, a file with other hard links, a FIFO)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return st.st_size
    return 0


def tree_ids(root: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``root``, every folder and file below it, and whatever the links
    below it point to: what a path must not share to be outside the tree."""
    ids: set[tuple[int, int]] = set()

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        ids.add((st.st_dev, st.st_ino))

    add(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            add(os.path.join(dirpath, name))
    return ids
