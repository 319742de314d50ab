"""The one crash-safe file writer of tk: temp file in the target folder, fsync, rename, fsync
the folder. Models, blobs, imported-weights pointers, plots, training checkpoints and
feature caches are all written through it.

```python
from model_store.atomic import atomic_write, atomic_file

atomic_write(path, [b"...", memoryview(...)], "model 'demo'")   # chunks -> file, bytes written
with atomic_file(path, "checkpoint") as fh:                      # a binary file to stream into
    torch.save(state, fh)          # (fh.name is the temp path, for libraries that want a path)
```

Guarantees, whoever calls it:

- Readers of ``path`` see the old file (or none) or the complete new one, even if the
  writer is killed at any instant (``kill -9``, power loss after the fsyncs).
- A failed write (disk full, quota, file-size limit, an exception in the ``with`` body)
  removes its temp file and raises one :class:`~toolkit.errors.StoreError` line naming
  ``what`` and the cause; the old file is untouched.
- **No temp file of a dead writer outlives the next successful write in its folder.** Temp
  files are named ``.tk-tmp-<pid>.<start>-<random>-<name>`` (``start``: the process's start
  time, so a reused pid is not mistaken for the writer); every write removes, before and
  after it writes, the temp files in its folder whose writer is gone (or that are older
  than a day). Temp files of live writers are left alone. One host per store folder is
  assumed (pids are per host).

:func:`store_lock` serialises the store's writers (saves, imports, removals, garbage
collection) across processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from toolkit.errors import StoreError, describe_os_error

TEMP_PREFIX = ".tk-tmp-"
# .tk-tmp-<pid>[.<start ticks>]-<hex>-<name>   (the start is absent in files of older tk)
_TEMP_RE = re.compile(r"^\.tk-tmp-(\d+)(?:\.(\d+))?-[0-9a-f]+-")
STALE_AFTER_S = 24 * 3600  # a temp file this old is stale whoever wrote it (other hosts)
_MAX_NAME = 255


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


_describe = describe_os_error


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


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


_OWN_START: int | None = None


def _own_start() -> int | None:
    global _OWN_START
    if _OWN_START is None:
        found = _proc_stat(os.getpid())
        _OWN_START = found[1] if found else -1
    return None if _OWN_START == -1 else _OWN_START


def temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path`` that :func:`clean_stale_temps` can attribute."""
    start = _own_start()
    who = f"{os.getpid()}.{start}" if start is not None else str(os.getpid())
    head = f"{TEMP_PREFIX}{who}-{secrets.token_hex(4)}-"
    tail = path.name
    room = _MAX_NAME - len(head.encode())
    if len(tail.encode()) > room:  # keep the end (the suffix) of a very long name
        tail = tail.encode()[-room:].decode("utf-8", "ignore")
    return path.parent / f"{head}{tail}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], what: str) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: on a clean exit it is flushed, fsynced and
    renamed onto ``path`` (then the folder is fsynced); on any error it is removed and the
    old ``path`` stays. ``fh.name`` is the temp file's path, for libraries that only take
    a path (write there while the ``with`` is open; the rename comes after)."""
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot write {what} to {path}: {_describe(exc)}") from exc
    clean_stale_temps(directory)
    tmp = temp_path(path)
    try:
        fh = open(tmp, "xb")  # noqa: SIM115 - closed below, before the rename
    except OSError as exc:
        raise StoreError(f"cannot write {what} to {path}: {_describe(exc)}") from exc
    try:
        try:
            with fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise StoreError(f"cannot write {what} to {path}: {_describe(exc)}") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(directory)
    clean_stale_temps(directory)


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview],
                 what: str) -> int:
    """Write ``chunks`` to ``path`` atomically (see :func:`atomic_file`); return the bytes
    written."""
    written = 0
    with atomic_file(path, what) as fh:
        for chunk in chunks:
            fh.write(chunk)
            written += len(chunk)
    return written


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def writer_alive(pid: int, start: int | None) -> bool:
    """Whether the process that wrote a temp file (its pid, and its start time when the
    name records it) still runs. Zombies count as gone."""
    if pid == os.getpid():
        own = _own_start()
        return start is None or own is None or start == own
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        pass
    found = _proc_stat(pid)
    if found is None:
        return True  # no /proc: the pid exists, so assume it is the writer
    state, started = found
    if state == "Z":
        return False
    return start is None or start == started


def clean_stale_temps(directory: Path, now: float | None = None) -> list[Path]:
    """Remove temp files in ``directory`` left by writers that died (their process is gone,
    or they are older than a day). Live writers' temp files are left alone. Returns what
    was removed."""
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
        stale = (age > STALE_AFTER_S or match is None
                 or not writer_alive(int(match.group(1)),
                                     int(match.group(2)) if match.group(2) else None))
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
