"""Crash-safe file writes for the store: temp file in the target directory, fsync, rename,
fsync the directory; stale temp files from killed writers are recognised and removed; one
lock per store serialises writers (saves, removals, garbage collection)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from toolkit.errors import StoreError

TEMP_PREFIX = ".tk-tmp-"
_TEMP_RE = re.compile(r"^\.tk-tmp-(\d+)-[0-9a-f]+-")
STALE_AFTER_S = 24 * 3600  # a temp file this old is stale whoever wrote it (other hosts)


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


def ensure_dir(path: Path, what: str = "model store") -> None:
    """Create ``path`` (and parents) or raise a one-line :class:`StoreError`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise StoreError(f"cannot use {what} at {path}: a file is in the way") from exc
    except OSError as exc:
        raise StoreError(f"cannot create {what} at {path}: {_describe(exc)}") from exc
    if not path.is_dir():
        raise StoreError(f"cannot use {what} at {path}: not a directory")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview], what: str) -> int:
    """Write ``chunks`` to ``path`` atomically; return the bytes written.

    Readers see either the old file (or none) or the complete new one, even if the process
    is killed at any point. On failure the temp file is removed and a :class:`StoreError`
    names ``what`` and the cause (disk full, permission denied...).
    """
    directory = path.parent
    ensure_dir(directory)
    tmp = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}"
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with open(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                written += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise StoreError(f"cannot write {what} to {path}: {_describe(exc)}") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(directory)
    return written


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(directory: Path, now: float | None = None) -> list[Path]:
    """Remove temp files left by writers that died (their pid is gone, or they are older
    than a day). Live writers' temp files are left alone. Returns what was removed."""
    removed: list[Path] = []
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        match = _TEMP_RE.match(entry.name)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        stale = age > STALE_AFTER_S or match is None or not _pid_alive(int(match.group(1)))
        if stale:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on the store (advisory, released by the OS if the holder dies)."""
    ensure_dir(root)
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot lock model store at {root}: {_describe(exc)}") from exc
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock
