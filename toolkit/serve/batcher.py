"""Dynamic batching for `tk serve`: images from concurrent requests run through the model
together.

Each uploaded image is decoded and cropped in a thread pool (off the event loop) by the
same :class:`toolkit.data.batches.Preparer` as `tk infer` (so a bad file fails with the
same one-line reason), then queued. One asyncio task takes the first queued image, waits
up to ``max_wait`` seconds for more (or takes what is already queued, up to
``max_batch``), stacks the crops and makes **one** runtime call for the batch in a
dedicated model thread (:meth:`toolkit.predict.runner.Runner.predict_crops`). While the
model computes, the next batch gathers, so under load batches fill without waiting.

No FastAPI here: this is plain asyncio around a :class:`~toolkit.predict.runner.Runner`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from toolkit.predict.runner import Prediction, Runner


@dataclass
class Stats:
    """Counters shown by ``GET /v1/stats``."""

    requests: int = 0  # prediction requests answered
    images: int = 0  # images that went through the model
    failed: int = 0  # images refused by the decoder (error rows)
    batches: int = 0  # runtime calls
    largest_batch: int = 0
    in_flight: int = 0  # images decoded or queued, not answered yet

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class _Item:
    name: str
    crop: np.ndarray
    future: asyncio.Future[Prediction]


class Batcher:
    """Queue images, run them through ``runner`` in batches of up to ``max_batch``, waiting
    at most ``max_wait`` seconds for a batch to fill. ``runner`` must have ``topk`` = the
    class count (each request keeps the top ``k`` it asked for)."""

    def __init__(self, runner: Runner, *, max_batch: int = 32, max_wait: float = 0.005,
                 decode_threads: int | None = None):
        from toolkit.data.batches import Preparer

        self.runner = runner
        self.prepare = Preparer(runner.transform, "pil")
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait))
        self.decode_threads = decode_threads or max(1, min(4, os.cpu_count() or 1))
        self.stats = Stats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._model_pool: ThreadPoolExecutor | None = None
        self._decode_pool: ThreadPoolExecutor | None = None

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="tk-model")
        self._decode_pool = ThreadPoolExecutor(self.decode_threads,
                                               thread_name_prefix="tk-decode")
        self._task = asyncio.create_task(self._run(), name="tk-batcher")

    async def stop(self) -> None:
        """Answer what is queued, then stop (the server has stopped taking requests)."""
        if self._task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60  # uvicorn cancels requests it gave up on before this
        while self.stats.in_flight and not self._task.done() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        for pool in (self._model_pool, self._decode_pool):
            if pool is not None:
                pool.shutdown(wait=True)

    # -- requests --------------------------------------------------------------------------
    async def predict(self, images: Sequence[tuple[str, bytes]], topk: int) -> list[Prediction]:
        """One row per ``(name, bytes)``, in order: an error row for an image that cannot
        be decoded, else its top ``topk`` classes."""
        from toolkit.data.batches import CROP
        from toolkit.predict.runner import Prediction

        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        n = len(images)
        self.stats.in_flight += n
        try:
            prepared = await asyncio.gather(*(
                loop.run_in_executor(self._decode_pool, self.prepare, data)
                for _, data in images))
            rows: list[Any] = [None] * n
            waits: list[tuple[int, asyncio.Future[Prediction]]] = []
            for i, ((name, _), (kind, payload)) in enumerate(zip(images, prepared,
                                                                  strict=True)):
                if kind == CROP:
                    fut: asyncio.Future[Prediction] = loop.create_future()
                    self._queue.put_nowait(_Item(name, payload, fut))
                    waits.append((i, fut))
                else:
                    rows[i] = Prediction(name, None, None, [], payload, i)
                    self.stats.failed += 1
            done = await asyncio.gather(*(f for _, f in waits))
            for (i, _), row in zip(waits, done, strict=True):
                rows[i] = dataclasses.replace(row, topk=row.topk[:topk], index=i)
            self.stats.requests += 1
            return rows
        finally:
            self.stats.in_flight -= n

    # -- the batching loop -----------------------------------------------------------------
    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            items = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                if not queue.empty():
                    items.append(queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            items = [it for it in items if not it.future.done()]  # clients that left
            if items:
                await self._batch(loop, items)

    async def _batch(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        import numpy as np

        crops = np.stack([it.crop for it in items])
        names = [it.name for it in items]
        try:
            rows = await loop.run_in_executor(self._model_pool, self.runner.predict_crops,
                                              crops, names)
        except Exception as exc:  # the model failed: these requests get a 500, others go on
            for it in items:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.images += len(items)
        self.stats.largest_batch = max(self.stats.largest_batch, len(items))
        for it, row in zip(items, rows, strict=True):
            if not it.future.done():
                it.future.set_result(row)
