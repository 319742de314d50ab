"""A run's folder in the store (``runs/NAME``): its lock, its checkpoint, and the checks
that every place the run will write to is writable before any training starts.

One process at a time works on a run: :meth:`RunDir.lock` takes an exclusive ``flock`` on
``runs/NAME/.lock`` at start (released by the OS if the process dies), so a second
``tk finetune --name NAME`` is refused at once instead of overwriting the first one's
checkpoint. Holding the lock also means every temp file in the folder is a dead writer's:
they are removed then."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from toolkit.errors import StoreError, TkError


class RunInProgressError(TkError):
    """Another process holds the run's lock."""


CHECKPOINT = "checkpoint.safetensors"
LOCK = ".lock"


class RunDir:
    def __init__(self, runs_root: Path, name: str):
        self.root = runs_root
        self.name = name
        self.path = runs_root / name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @staticmethod
    def latest(runs_root: Path) -> str:
        """The name of the run whose checkpoint was written last (``--resume`` without
        ``--name``)."""
        runs = sorted((p for p in runs_root.glob(f"*/{CHECKPOINT}") if p.is_file()),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise TkError(f"--resume: no interrupted run in {runs_root}; pass --name NAME")
        return runs[-1].parent.name

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock: refused at once (one line) while another process holds
        it. Stale temp files of killed writers are removed once it is held."""
        from model_store.atomic import ensure_dir

        ensure_dir(self.path, "run folder")
        fd = _lock_file(self.path / LOCK, self.name)
        try:
            self.clean_temps()
            yield
        finally:
            if not self.checkpoint.exists():  # finished, or failed before any epoch ended
                with contextlib.suppress(OSError):
                    (self.path / LOCK).unlink()
                    self.path.rmdir()
            os.close(fd)  # releases the flock

    def clean_temps(self) -> list[Path]:
        """Remove every temp file in the folder (call with the lock held: no live writer
        can own one)."""
        from model_store.atomic import is_temp_name

        removed = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path):
                if is_temp_name(entry.name) or entry.name.startswith(".ckpt-"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
        return removed

    def finish(self) -> None:
        """The model is saved: the checkpoint is not needed any more (the folder goes when
        the lock is released)."""
        self.checkpoint.unlink(missing_ok=True)


def _lock_file(path: Path, name: str) -> int:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        fcntl = None  # type: ignore[assignment]
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot lock run '{name}' ({path}): "
                             f"{exc.strerror or exc}") from None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInProgressError(
                    f"run '{name}' is in progress in another process (its lock {path} is "
                    "held); wait for it to finish, or choose another --name") from None
            raise StoreError(f"cannot lock run '{name}' ({path}): "
                             f"{exc.strerror or exc}") from None
        # the holder may have removed the file between our open and our lock (it does so
        # when it finishes): lock the file that is there now, not an orphan
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def check_writable(directories: list[tuple[Path, str]]) -> None:
    """Create each directory and write (then remove) a probe file in it, so that a
    read-only store or a file in the way fails before training, not after it."""
    from model_store.atomic import TEMP_PREFIX, ensure_dir

    for directory, what in directories:
        ensure_dir(directory, what)
        probe = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            reason = ("read-only file system" if exc.errno == errno.EROFS
                      else exc.strerror or str(exc))
            raise StoreError(f"cannot write to {what} {directory}: {reason}; the run would "
                             "fail after training, so it does not start") from None
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
