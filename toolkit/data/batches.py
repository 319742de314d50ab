"""Files -> batches of ``uint8`` crops, decoded in worker processes, for any runtime.

This is the data side of `tk infer` and `tk eval`, shared by every inference runtime
(torch and ONNX Runtime), and it imports neither torch nor torchvision:

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
are daemons that ignore Ctrl-C (the main process stops them), and hand their arrays back
pickled through one pipe each (two file descriptors per worker, none per batch, so a low
``ulimit -n`` does not break them; when the pool cannot start for lack of file
descriptors or processes, fewer workers are used, down to decoding in the main process,
and that is said in one line).
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

DECODERS = ("auto", "pil", "draft", "torchvision")
"""``auto`` (the default): reduced-size JPEG decoding only where the file is at least
:data:`AUTO_DRAFT_MARGIN` times the size the resize needs, and never below that margin (so
the resize still antialiases from at least twice its output), full-size decoding otherwise;
``pil``: full-size decoding, exact eval transform; ``draft``: reduced-size JPEG decoding
(libjpeg DCT scaling by 1/2, 1/4 or 1/8, never below the resize size); ``torchvision``:
plain JPEGs handed to the runtime as bytes (decoded on the device), other files as
``pil``."""

AUTO_DRAFT_MARGIN = 2

CROP, JPEG, ERROR = 0, 1, 2  # what a file became


def default_workers() -> int:
    """``min(4, usable CPU cores)``."""
    from toolkit.env import usable_cpus

    return max(0, min(4, usable_cpus()))


@dataclass
class Preparer:
    """One file -> ``(CROP, uint8 [H,W,3])``, ``(JPEG, bytes)`` or ``(ERROR, reason)``.
    Picklable (a transform of numbers and strings and a decoder name)."""

    transform: EvalTransform
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.decode not in DECODERS:
            raise TkError(f"--decode {self.decode}: expected one of {', '.join(DECODERS)}")

    @property
    def draft_size(self) -> int | None:
        """The short side reduced-size JPEG decoding may go down to (None: full size)."""
        if self.decode == "auto":
            return AUTO_DRAFT_MARGIN * self.transform.draft_size
        return self.transform.draft_size if self.decode == "draft" else None

    def __call__(self, path: str) -> tuple[int, Any]:
        from toolkit.data.decode import load_image, plain_jpeg_bytes

        try:
            if self.decode == "torchvision":
                raw = plain_jpeg_bytes(path)
                if raw is not None:
                    return JPEG, raw
            return CROP, self.transform.crop(load_image(path, draft_size=self.draft_size))
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

def _worker_loop(conn: Any, prep: Preparer) -> None:
    """A decoding worker: tasks ``(indices, paths)`` in, :class:`HostBatch` out, one pipe."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            result: Any = prepare_batch(prep, *task)
        except BaseException as exc:  # not a file's fault (e.g. out of memory stacking)
            result = f"{type(exc).__name__}: {exc}"
        try:
            conn.send(result)
        except (OSError, ValueError):
            return


def _context() -> Any:
    import multiprocessing as mp

    methods = mp.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods:
        return mp.get_context("fork")  # what torch's DataLoader uses: no re-import
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM}


class _Pool:
    """``workers`` daemon processes, each behind its own pipe. Tasks go to the workers in
    turn and each works through its own in order, so reading the workers in the order the
    tasks were sent gives the results in input order (no reordering, no feeder threads)."""

    def __init__(self, workers: int, prep: Preparer):
        ctx = _context()
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        try:
            for _ in range(workers):
                parent, child = ctx.Pipe(duplex=True)
                try:
                    proc = ctx.Process(target=_worker_loop, args=(child, prep), daemon=True,
                                       name="tk-decode")
                    proc.start()
                except BaseException:
                    parent.close()
                    raise
                finally:
                    child.close()  # the worker holds it now: its death is our EOF
                self.procs.append(proc)
                self.conns.append(parent)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, k: int, task: Any) -> None:
        try:
            self.conns[k].send(task)
        except (OSError, ValueError):
            raise _died() from None

    def recv(self, k: int) -> HostBatch:
        try:
            result = self.conns[k].recv()
        except (EOFError, OSError):
            raise _died() from None
        if isinstance(result, str):
            raise TkError(f"a decoding worker failed: {result}")
        return result

    def close(self) -> None:
        """Stop the workers: ask, wait a moment, then terminate (a worker busy with a batch
        nobody will read is not waited for)."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


def _died() -> TkError:
    return TkError("a decoding worker process died (killed, or out of memory?); the rows "
                   "written so far are complete: rerun with -o FILE --resume to continue")


FDS_MAIN = 8
"""File descriptors kept free for the main process (the output, the model, libraries)."""
FDS_PER_WORKER = 4
"""File descriptors a worker costs: its pipe end and sentinel in the main process, and
room in the worker itself, which inherits the main process's descriptors, for an image."""


def _fd_headroom() -> tuple[int, int] | None:
    """``(free file descriptors, ulimit -n)``, or ``None`` when unlimited or unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return None
        open_now = len(os.listdir("/proc/self/fd")) - 1  # listdir's own descriptor
    except (ImportError, OSError, ValueError):
        return None
    return soft - open_now, soft


def _start_pool(workers: int, prep: Preparer, warn: Callable[[str], None]) -> _Pool | None:
    """A pool of ``workers`` processes, fewer when the file-descriptor limit leaves room
    for fewer or the system refuses that many (descriptors, processes, memory), ``None``
    for decoding in this process; said once."""
    from toolkit.data.decode import pil

    pil()  # import Pillow's decoders once, here: forked workers inherit them
    wanted, reason = workers, ""
    room = _fd_headroom()
    if room is not None:
        free, limit = room
        fit = max(0, (free - FDS_MAIN) // FDS_PER_WORKER)
        if fit < workers:
            workers = fit
            reason = f"ulimit -n is {limit}, {limit - free} files open"
    while workers > 0:
        try:
            pool = _Pool(workers, prep)
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            reason = exc.strerror or str(exc)
            room = _fd_headroom()
            if room is not None:
                reason += f"; ulimit -n is {room[1]}"
            workers //= 2
            continue
        if workers < wanted:
            warn(f"cannot start {wanted} decoding workers ({reason}); using {workers}")
        return pool
    warn(f"cannot start decoding workers ({reason}); decoding in the main process")
    return None


def iter_batches(paths: Sequence[str], indices: Sequence[int], prep: Preparer, *,
                 batch_size: int, workers: int, prefetch: int = 2,
                 warn: Callable[[str], None] | None = None) -> Iterator[HostBatch]:
    """:class:`HostBatch` objects for ``paths[i] for i in indices``, ``batch_size`` files
    each, in order, decoded by ``workers`` processes (``0``: in this process; a single
    batch is always decoded here, which saves starting a pool for one file). Each worker
    has at most ``prefetch`` batches queued."""
    from toolkit.data.listing import warn_stderr

    warn = warn or warn_stderr
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]

    def task(chunk: Sequence[int]) -> tuple[list[int], list[str]]:
        return list(chunk), [paths[i] for i in chunk]

    workers = min(int(workers), len(chunks)) if len(chunks) > 1 else 0
    pool = _start_pool(workers, prep, warn) if workers > 0 else None
    if pool is None:
        for chunk in chunks:
            yield prepare_batch(prep, *task(chunk))
        return
    try:
        order: deque[int] = deque()  # the worker holding each outstanding chunk, in order
        following = iter(chunks)
        for j, chunk in zip(range(len(pool) * max(1, prefetch)), following, strict=False):
            pool.send(j % len(pool), task(chunk))
            order.append(j % len(pool))
        while order:
            k = order.popleft()
            batch = pool.recv(k)
            nxt = next(following, None)
            if nxt is not None:
                pool.send(k, task(nxt))
                order.append(k)
            yield batch
    finally:
        pool.close()
