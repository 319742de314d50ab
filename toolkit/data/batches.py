"""Files -> batches of ``uint8`` crops, decoded in worker processes, for any runtime.

This is the data side of `tk infer` and `tk eval`, shared by every inference runtime
(torch now, ONNX Runtime later), and it imports neither torch nor torchvision:

- :class:`Preparer` turns one file into a crop: :func:`toolkit.data.decode.load_image` (the
  one decoding path of training too) and the host half of the eval transform
  (:meth:`toolkit.data.transforms.EvalTransform.crop`), giving ``uint8 [H, W, 3]``; or,
  for the ``torchvision`` decoder, the bytes of a plain JPEG for the device to decode; or
  a one-line error. It never raises for a bad file.
- :func:`iter_batches` runs it over ``paths[i] for i in indices`` in a pool of worker
  processes and yields :class:`HostBatch` objects in input order: at most
  ``workers * prefetch`` batches are in flight, so memory stays flat however many files
  there are. Every sample keeps its index; a file that fails becomes an error at its own
  position and never enters the model.

Worker processes are forked (like torch's DataLoader workers) where the platform allows,
ignore Ctrl-C (the main process stops them), and hand their arrays back pickled through
a pipe (no file descriptor per batch, so a low ``ulimit -n`` does not break them; when
the pool itself cannot start for lack of file descriptors or processes, fewer workers
are used, down to decoding in the main process, and that is said in one line).
"""

from __future__ import annotations

import errno
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError

if TYPE_CHECKING:
    import numpy as np

    from toolkit.data.transforms import EvalTransform

DECODERS = ("pil", "draft", "torchvision")
"""``pil``: full-size decoding, exact eval transform; ``draft``: reduced-size JPEG decoding
(libjpeg DCT scaling, never below the resize size); ``torchvision``: plain JPEGs handed to
the runtime as bytes (decoded on the device), other files as ``pil``."""

CROP, JPEG, ERROR = 0, 1, 2  # what a file became


def default_workers() -> int:
    """``min(4, usable CPU cores)``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus))


@dataclass
class Preparer:
    """One file -> ``(CROP, uint8 [H,W,3])``, ``(JPEG, bytes)`` or ``(ERROR, reason)``.
    Picklable (a transform of numbers and strings and a decoder name)."""

    transform: EvalTransform
    decode: str = "pil"

    def __post_init__(self) -> None:
        if self.decode not in DECODERS:
            raise TkError(f"--decode {self.decode}: expected one of {', '.join(DECODERS)}")

    def __call__(self, path: str) -> tuple[int, Any]:
        from toolkit.data.decode import load_image, plain_jpeg_bytes

        try:
            if self.decode == "torchvision":
                raw = plain_jpeg_bytes(path)
                if raw is not None:
                    return JPEG, raw
            draft = self.transform.draft_size if self.decode == "draft" else None
            return CROP, self.transform.crop(load_image(path, draft_size=draft))
        except TkError as exc:
            return ERROR, getattr(exc, "reason", None) or str(exc)
        except MemoryError:
            return ERROR, "out of memory while decoding"
        except Exception as exc:  # a decoder bug must not end the run
            return ERROR, f"cannot preprocess: {type(exc).__name__}: {exc}"


@dataclass
class HostBatch:
    """One batch as the host holds it. ``indices[p]`` is the input index of position
    ``p``; ``crops[j]`` belongs to position ``crop_pos[j]``, ``jpegs[j]`` to
    ``jpeg_pos[j]``; ``errors[p]`` is the reason position ``p`` failed (else ``None``)."""

    indices: list[int]
    crops: np.ndarray | None = None  # uint8 [M, H, W, 3]
    crop_pos: list[int] = field(default_factory=list)
    jpegs: list[bytes] = field(default_factory=list)
    jpeg_pos: list[int] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)


def prepare_batch(prep: Preparer, indices: Sequence[int], paths: Sequence[str]) -> HostBatch:
    """Run ``prep`` over ``paths`` (the files of ``indices``) and stack the crops."""
    import numpy as np

    batch = HostBatch(list(indices), errors=[None] * len(indices))
    crops: list[np.ndarray] = []
    for p, path in enumerate(paths):
        kind, payload = prep(path)
        if kind == CROP:
            crops.append(payload)
            batch.crop_pos.append(p)
        elif kind == JPEG:
            batch.jpegs.append(payload)
            batch.jpeg_pos.append(p)
        else:
            batch.errors[p] = payload
    if crops:
        batch.crops = np.stack(crops)
    return batch


# -- the worker pool --------------------------------------------------------------------

_worker_prep: Preparer | None = None


def _init_worker(prep: Preparer) -> None:
    import signal

    global _worker_prep
    _worker_prep = prep
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C


def _work(indices: list[int], paths: list[str]) -> HostBatch:
    assert _worker_prep is not None
    return prepare_batch(_worker_prep, indices, paths)


def _context() -> Any:
    import multiprocessing as mp

    methods = mp.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods:
        return mp.get_context("fork")  # what torch's DataLoader uses: no re-import
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM}


def _start_pool(workers: int, prep: Preparer, first: list[tuple[list[int], list[str]]],
                warn: Callable[[str], None]) -> tuple[Any, deque[Any]]:
    """A pool of ``workers`` processes (fewer when the system refuses that many) with the
    ``first`` tasks submitted; ``(None, deque())`` for decoding in this process."""
    from concurrent.futures import ProcessPoolExecutor

    wanted = workers
    reason = ""
    while workers > 0:
        pool = None
        try:
            pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_init_worker,
                                       initargs=(prep,))
            pending = deque(pool.submit(_work, *task) for task in first)
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            reason = exc.strerror or str(exc)
            if pool is not None:
                _close(pool)
            workers //= 2
            continue
        if workers < wanted:
            warn(f"cannot start {wanted} decoding workers ({reason}{_fd_limit()}); "
                 f"using {workers}")
        return pool, pending
    warn(f"cannot start decoding workers ({reason}{_fd_limit()}); decoding in the main "
         "process")
    return None, deque()


def _fd_limit() -> str:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return f"; ulimit -n is {soft}"
    except (ImportError, OSError, ValueError):
        return ""


def _close(pool: Any) -> None:
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    except Exception:  # a broken pool is already gone
        pass


def iter_batches(paths: Sequence[str], indices: Sequence[int], prep: Preparer, *,
                 batch_size: int, workers: int, prefetch: int = 2,
                 warn: Callable[[str], None] | None = None) -> Iterator[HostBatch]:
    """:class:`HostBatch` objects for ``paths[i] for i in indices``, ``batch_size`` files
    each, in order, decoded by ``workers`` processes (``0``: in this process; a single
    batch is always decoded here, which saves starting a pool for one file)."""
    from toolkit.data.listing import warn_stderr

    warn = warn or warn_stderr
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]

    def task(chunk: Sequence[int]) -> tuple[list[int], list[str]]:
        return list(chunk), [paths[i] for i in chunk]

    workers = min(int(workers), len(chunks)) if len(chunks) > 1 else 0
    pool, pending = None, deque()
    if workers > 0:
        first = [task(c) for c in chunks[:workers * prefetch]]
        pool, pending = _start_pool(workers, prep, first, warn)
    if pool is None:
        for chunk in chunks:
            yield prepare_batch(prep, *task(chunk))
        return
    from concurrent.futures.process import BrokenProcessPool

    following = iter(chunks[len(pending):])
    try:
        while pending:
            head = pending.popleft()
            try:
                batch = head.result()
            except BrokenProcessPool:
                raise TkError("a decoding worker process died (killed, or out of memory?); "
                              "the rows written so far are complete: rerun with -o FILE "
                              "--resume to continue") from None
            nxt = next(following, None)
            if nxt is not None:
                pending.append(pool.submit(_work, *task(nxt)))
            yield batch
    finally:
        for future in pending:
            future.cancel()
        _close(pool)
