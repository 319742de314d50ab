"""Batch inference: files in, one row per file out, whatever the runtime.

```python
import toolkit
from toolkit.predict.runner import predict, predict_tensors

loaded = toolkit.load_model("my-model")
for row in predict(loaded, ["photos/", "more/*.jpg"], batch_size=64, topk=3):
    print(row.path, row.label, row.score, row.error)       # one row per file, input order
rows = predict_tensors(loaded, images)                     # images: [N,3,H,W] preprocessed
```

How a file becomes a row (each step in its own module):

1. :mod:`toolkit.data.listing` lists the inputs (sorted, deduplicated, hidden files skipped).
2. :mod:`toolkit.data.batches` decodes the files in worker processes
   (:func:`toolkit.data.decode.load_image`: EXIF orientation, colour modes, size and
   aspect limits, the one decoding path of training too) and applies the host half of the
   model's eval transform (:meth:`toolkit.data.transforms.EvalTransform.crop`): ``uint8``
   crops, batched, at most a few batches ahead (flat memory). No torch there.
3. A :class:`toolkit.predict.runtime.Runtime` turns a batch of crops into logits: the torch
   runtime (:mod:`toolkit.predict.torch_runtime`) normalises on the device (the device half
   of the same transform, bit for bit what validation used during training) and runs the
   model; the ONNX Runtime runtime (:mod:`toolkit.predict.onnx_runtime`) hands the crops
   to an exported graph that normalises inside itself, without torch.
   :func:`toolkit.predict.session.open_predictor` picks and opens one from ``--model``.
   The next batch is started before the previous one's logits are read back.
4. :class:`Runner` maps logits to scores and the top ``k`` classes through
   :mod:`toolkit.predict.scoring` (the model's calibration temperature, ``--min-score``;
   sigmoid and per-class thresholds for a multi-label model), and every
   sample keeps its input index: a file that could not be read is an error row at its own
   position and never enters the model, so no row can carry another file's prediction.
5. Rows come out in input order as soon as their batch is done.

Decoders (``decode``): ``pil`` (default) decodes every file at full size, so predictions are
exactly those of the eval transform. ``draft`` lets libjpeg decode large JPEGs at 1/2, 1/4 or
1/8 scale (never below the resize size the transform needs): faster for big photos, pixels
slightly different (see benchmarks/README.md). ``torchvision`` (runtimes that accept JPEG
bytes: torch) decodes plain JPEGs on the model's device (nvJPEG, batched, on CUDA) and
resizes there; other files, JPEGs with an EXIF rotation, CMYK JPEGs and transforms with an
interpolation tensors lack use the ``pil`` path. Pillow and torchvision both use
libjpeg-turbo, so on the CPU ``torchvision`` is no faster; the CUDA path is untested here.

Under torchrun (a torch process group of more than one process, already initialised)
every rank predicts the files ``rank::world_size`` of the list; after each batch the ranks
send their rows to rank 0, which yields them all in input order (the other ranks yield
nothing, but must still iterate to the end).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.data.batches import DECODERS, HostBatch, Preparer, default_workers, iter_batches
from toolkit.data.listing import PathList, Warn, discover, warn_stderr
from toolkit.errors import TkError
from toolkit.predict.scoring import Scoring, multilabel_rows, rows_of

if TYPE_CHECKING:
    import numpy as np
    import torch

    from toolkit.data.transforms import EvalTransform
    from toolkit.model.loading import LoadedModel
    from toolkit.predict.runtime import Runtime

__all__ = ["DECODERS", "Prediction", "Predictor", "Runner", "default_workers", "predict",
           "predict_tensors"]


@dataclass
class Prediction:
    """One row: a file (``path``) or one tensor of a batch (``path`` None)."""

    path: str | None
    label: str | None
    score: float | None
    topk: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    index: int = -1  # position in the input list
    # multi-label models: the predicted labels (best first) with their scores
    labels: list[tuple[str, float]] | None = None
    # with ``Runner(keep_outputs=True)``: the row's raw logits ``[C]`` and, when the runtime
    # appends them after the logits, its backbone features (`tk review`); never written
    logits: np.ndarray | None = field(default=None, repr=False, compare=False)
    features: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The jsonl row: ``{"path","label","score","topk":[{"label","score"}],"error"}``;
        multi-label models add ``"labels": [...]`` and ``"label_scores": [...]``."""
        row: dict[str, Any] = {"path": self.path, "label": self.label, "score": self.score,
                               "topk": [{"label": lab, "score": s} for lab, s in self.topk],
                               "error": self.error}
        if self.labels is not None:
            row["labels"] = [lab for lab, _ in self.labels]
            row["label_scores"] = [s for _, s in self.labels]
        return row


class Runner:
    """Files -> rows with any :class:`~toolkit.predict.runtime.Runtime`.

    ``transform``: the model's eval transform (its host half runs in the decoding workers);
    ``classes``: the model's class names (index = logit column); ``scoring``: temperature
    and ``--min-score`` (:mod:`toolkit.predict.scoring`; default: the plain softmax);
    ``thresholds``: a multi-label model's per-class thresholds (sigmoid scores, rows with
    ``labels``). ``keep_outputs``: rows also carry their raw ``logits`` and, when the
    runtime returns more columns than classes (features appended after the logits),
    ``features``."""

    def __init__(self, runtime: Runtime, transform: EvalTransform, classes: Sequence[str], *,
                 batch_size: int = 32, topk: int = 1, workers: int | None = None,
                 decode: str = "auto", warn: Warn = warn_stderr,
                 scoring: Scoring | None = None, keep_outputs: bool = False,
                 thresholds: Sequence[float] | None = None):
        if int(batch_size) < 1:
            raise TkError(f"--batch-size must be at least 1, got {batch_size}")
        if int(topk) < 1:
            raise TkError(f"--topk must be at least 1, got {topk}")
        if workers is not None and int(workers) < 0:
            raise TkError(f"--workers must be 0 or more, got {workers}")
        if decode not in DECODERS:
            raise TkError(f"--decode {decode}: expected one of {', '.join(DECODERS)}")
        from toolkit.data.transforms import TENSOR_INTERPOLATIONS

        if decode == "torchvision" and not runtime.accepts_jpeg:
            raise TkError(f"--decode torchvision needs the torch runtime (the {runtime.name} "
                          "runtime decodes with Pillow: --decode pil or draft)")
        if decode == "torchvision" and transform.interpolation not in TENSOR_INTERPOLATIONS:
            warn(f"--decode torchvision: interpolation '{transform.interpolation}' has no "
                 "tensor version; decoding with PIL")
            decode = "pil"
        self.runtime = runtime
        self.transform = transform
        self.classes = list(classes)
        self.batch_size = int(batch_size)
        self.topk = min(int(topk), len(self.classes))
        self.workers = default_workers() if workers is None else int(workers)
        self.decode = decode
        self.warn = warn
        self.scoring = scoring or Scoring()
        self.keep_outputs = bool(keep_outputs)
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]

    def _scored(self, logits: np.ndarray) -> list[tuple[str | None, float, list[Any],
                                                        list[Any] | None]]:
        """Per row of ``logits [N, C]``: (label, score, top k, multi-label labels or None)."""
        if self.thresholds is None:
            return [(label, score, top, None)
                    for label, score, top in rows_of(logits, self.classes, self.topk,
                                                     self.scoring)]
        out: list[tuple[str | None, float, list[Any], list[Any] | None]] = []
        for r in multilabel_rows(logits, self.thresholds, self.classes, self.topk):
            best = r.top[0]
            label = best[0] if r.labels and r.labels[0][0] == best[0] else None
            out.append((label, best[1], r.top, r.labels))
        return out

    def _predictions(self, logits: np.ndarray, paths: Sequence[str | None],
                     indices: Sequence[int]) -> list[Prediction]:
        """Rows for ``logits [N, C(+F)]`` (scored by :attr:`scoring` or the thresholds)."""
        c = len(self.classes)
        out = []
        for j, (label, score, top, labels) in enumerate(self._scored(logits[:, :c])):
            row = Prediction(paths[j], label, score, top, None, indices[j], labels)
            if self.keep_outputs:
                row.logits = logits[j, :c].copy()
                row.features = logits[j, c:].copy() if logits.shape[1] > c else None
            out.append(row)
        return out

    def _rows(self, paths: Sequence[str], batch: HostBatch, handle: Any) -> list[Prediction]:
        """The rows of a batch whose work was started as ``handle``, in batch order."""
        errors = list(batch.errors)
        rows: list[Prediction | None] = [None] * len(batch)
        if handle is not None:
            logits, jpeg_errors = self.runtime.finish(handle)
            positions = [*batch.crop_pos, *batch.jpeg_pos]
            for p, err in zip(batch.jpeg_pos, jpeg_errors, strict=True):
                errors[p] = err
            if len(positions):
                made = self._predictions(logits[:len(positions)],
                                         [paths[batch.indices[p]] for p in positions],
                                         [batch.indices[p] for p in positions])
                for p, row in zip(positions, made, strict=True):
                    if errors[p] is None:
                        rows[p] = row
        for p, row in enumerate(rows):
            if row is None:
                rows[p] = Prediction(paths[batch.indices[p]], None, None, [],
                                     errors[p] or "not predicted", batch.indices[p])
        return rows  # type: ignore[return-value]

    def _local_rows(self, paths: Sequence[str], indices: Sequence[int]
                    ) -> Iterator[list[Prediction]]:
        """Rows of ``paths[i] for i in indices``, one list per batch, in order; batch
        ``k + 1`` is started before batch ``k``'s results are read."""
        prep = Preparer(self.transform, self.decode)
        pending: tuple[HostBatch, Any] | None = None
        for batch in iter_batches(paths, indices, prep, batch_size=self.batch_size,
                                  workers=self.workers, warn=self.warn):
            work = batch.crops is not None or batch.jpegs
            handle = self.runtime.start(batch.crops, batch.jpegs) if work else None
            if pending is not None:
                yield self._rows(paths, *pending)
            pending = (batch, handle)
        if pending is not None:
            yield self._rows(paths, *pending)

    def predict_crops(self, crops: np.ndarray, names: Sequence[str | None]
                      ) -> list[Prediction]:
        """Rows for crops already made by the transform's host half (``uint8 [N,H,W,3]``,
        e.g. images uploaded to `tk serve`), ``path`` = ``names[i]``, one runtime call."""
        n = len(names)
        batch = HostBatch(list(range(n)), crops, list(range(n)), errors=[None] * n)
        return self._rows(names, batch, self.runtime.start(crops) if n else None)

    def predict_paths(self, paths: PathList | Sequence[str]) -> Iterator[Prediction]:
        """One row per path, in order (distributed: see the module doc)."""
        if not isinstance(paths, PathList):
            paths = PathList(paths)
        n = len(paths)
        shard = _torch_shard()
        if shard is None:
            for rows in self._local_rows(paths, range(n)):
                yield from rows
            return
        rank, world, gather = shard
        mine = range(rank, n, world)
        rounds = math.ceil(math.ceil(n / world) / self.batch_size)
        local = self._local_rows(paths, mine)
        for _ in range(rounds):
            gathered = gather(next(local, []))
            if gathered is not None:  # rank 0
                longest = max(len(r) for r in gathered)
                for j in range(longest):
                    for r in range(world):
                        if j < len(gathered[r]):
                            yield gathered[r][j]
        for _ in local:  # nothing should be left; keep the pool's shutdown orderly
            pass


def _torch_shard() -> tuple[int, int, Any] | None:
    """``(rank, world_size, gather)`` when a torch process group of more than one process is
    initialised (torchrun); ``None`` otherwise. Looks only if torch is already imported, so
    runtimes without torch never import it."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    if world <= 1:
        return None
    rank = dist.get_rank()

    def gather(rows: list[Prediction]) -> list[list[Prediction]] | None:
        out: list[Any] = [None] * world if rank == 0 else []
        dist.gather_object(rows, out if rank == 0 else None, dst=0)
        return out if rank == 0 else None

    return rank, world, gather


class Predictor(Runner):
    """A :class:`Runner` on the torch runtime: ``loaded``'s model moved to ``device`` (in
    place) and put in eval mode."""

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 32, topk: int = 1,
                 device: str | torch.device = "auto", precision: str = "32",
                 channels_last: bool | None = None, workers: int | None = None,
                 decode: str = "auto", warn: Warn = warn_stderr, tta: bool = False,
                 calibrated: bool = True, min_score: float | None = None,
                 keep_outputs: bool = False):
        from toolkit.data.transforms import eval_transform
        from toolkit.predict.scoring import thresholds_of
        from toolkit.predict.torch_runtime import TorchRuntime

        if decode not in DECODERS:
            raise TkError(f"--decode {decode}: expected one of {', '.join(DECODERS)}")
        transform = eval_transform(loaded.data_config)
        self.loaded = loaded
        thresholds = thresholds_of(loaded.meta, len(loaded.classes))
        runtime = TorchRuntime(loaded.model, transform, device=device, precision=precision,
                               channels_last=channels_last, jpeg=decode == "torchvision",
                               tta=tta, multi_label=thresholds is not None)
        scoring = Scoring.for_model(loaded.meta, calibrated=calibrated, min_score=min_score)
        super().__init__(runtime, transform, loaded.classes, batch_size=batch_size, topk=topk,
                         workers=workers, decode=decode, warn=warn, scoring=scoring,
                         keep_outputs=keep_outputs, thresholds=thresholds)
        self.device = runtime.device
        self.model = runtime.model

    def predict_tensors(self, images: torch.Tensor) -> list[Prediction]:
        """Rows for preprocessed images ``[N,3,H,W]`` (``path`` None, ``index`` = row)."""
        logits = self.runtime.logits(images, self.batch_size)  # type: ignore[attr-defined]
        if not len(logits):
            return []
        return self._predictions(logits, [None] * len(logits), range(len(logits)))


def predict(loaded: LoadedModel, inputs: str | os.PathLike[str] | Iterable[Any], *,
            batch_size: int = 32, topk: int = 1, device: str = "auto", precision: str = "32",
            channels_last: bool | None = None, workers: int | None = None, decode: str = "auto",
            warn: Warn = warn_stderr, tta: bool = False, calibrated: bool = True,
            min_score: float | None = None) -> Iterator[Prediction]:
    """Rows for every image under ``inputs`` (files, folders, globs; see
    :mod:`toolkit.data.listing`), in input order. Bad files give rows with ``error`` set.
    Scores use the model's calibration unless ``calibrated`` is False; below ``min_score``
    a row's ``label`` is None (see :mod:`toolkit.predict.scoring`)."""
    paths = inputs if isinstance(inputs, PathList) else discover(
        inputs if isinstance(inputs, (str, os.PathLike)) else list(inputs), warn=warn)
    predictor = Predictor(loaded, batch_size=batch_size, topk=topk, device=device,
                          precision=precision, channels_last=channels_last, workers=workers,
                          decode=decode, warn=warn, tta=tta, calibrated=calibrated,
                          min_score=min_score)
    return predictor.predict_paths(paths)


def predict_tensors(loaded: LoadedModel, images: torch.Tensor, *, topk: int = 1,
                    device: str = "auto", precision: str = "32", channels_last: bool | None = None,
                    batch_size: int = 256, calibrated: bool = True,
                    min_score: float | None = None) -> list[Prediction]:
    """Rows for images already preprocessed with the model's eval transform."""
    predictor = Predictor(loaded, batch_size=batch_size, topk=topk, device=device,
                          precision=precision, channels_last=channels_last, workers=0,
                          calibrated=calibrated, min_score=min_score)
    return predictor.predict_tensors(images)
