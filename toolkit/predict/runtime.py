"""What the runner needs from an inference engine: a small interface, no torch.

A runtime turns a batch of ``uint8`` crops (the host half of the eval transform, made by
:mod:`toolkit.data.batches`) into logits. Everything else (listing, decoding, order, error
rows, scores, top-k, sharding, output) belongs to :class:`toolkit.predict.runner.Runner`,
so a new engine (ONNX Runtime, TensorRT...) is one class implementing :class:`Runtime`;
the runner does not change.

``start`` may return before the work is done (the torch runtime launches the forward pass
on the GPU and returns); the runner calls ``start`` for the next batch before ``finish``
for the previous one, so decoding, copying and computing overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np


@runtime_checkable
class Runtime(Protocol):
    """An inference engine for one model.

    ``name``: shown to users (``torch``, ``onnx``). ``accepts_jpeg``: whether ``start``
    takes JPEG bytes to decode itself (``--decode torchvision``); runtimes that do not are
    only ever given crops.
    """

    name: str
    accepts_jpeg: bool

    def start(self, crops: np.ndarray | None, jpegs: Sequence[bytes] = ()) -> Any:
        """Begin computing the logits of ``crops`` (``uint8 [N, H, W, 3]``, RGB, already
        resized and centre-cropped; ``None`` for none) followed by those of ``jpegs``.
        Returns a handle for :meth:`finish`."""
        ...

    def finish(self, handle: Any) -> tuple[np.ndarray, list[str | None]]:
        """Wait for ``handle``: ``float32`` logits ``[N + len(jpegs), classes]`` (crops
        first, then JPEGs, in the order given) and, per JPEG, ``None`` or the one-line
        reason it could not be decoded (its logits row is then meaningless)."""
        ...
