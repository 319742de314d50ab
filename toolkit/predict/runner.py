"""Batch inference with a stored model: the runner behind `tk infer` and the Python API.

```python
from model_store import ModelStore
from toolkit.predict.runner import predict, predict_tensors

loaded = load_model("my-model")
for row in predict(loaded, ["photos/", "more/*.jpg"], batch_size=64, topk=3):
    print(row.path, row.label, row.score, row.error)       # one row per file, input order
rows = predict_tensors(loaded, images)                     # images: [N,3,H,W] preprocessed
```

How a file becomes a row:

1. :mod:`toolkit.data.listing` lists the inputs (sorted, deduplicated, hidden files skipped).
2. DataLoader workers decode each file with :func:`toolkit.data.decode.load_image` (EXIF
   orientation, colour modes, size limit: the one decoding path of training too) and apply
   the model's eval transform (:func:`toolkit.data.transforms.eval_transform` of the stored
   ``data_config``): the tensors are the ones validation used during training. The
   transform is split (:class:`SplitEvalTransform`): workers resize and crop to ``uint8``,
   the device scales and normalises the batch, bit for bit as the whole transform would.
3. A sample carries its index through the collate function; a file that cannot be read
   becomes an error row at its own index and never enters the model, so no row can carry
   another file's prediction.
4. Batches go to the device (pinned memory and non-blocking copies on CUDA), through the
   model under ``torch.inference_mode`` and autocast (``precision``), optionally in
   channels-last layout; the next batch is launched before the previous one's results are
   copied back.
5. Rows come out in input order as soon as their batch is done.

Decoders (``decode``): ``pil`` (default) decodes every file at full size, so predictions are
exactly those of the eval transform. ``draft`` lets libjpeg decode large JPEGs at 1/2, 1/4 or
1/8 scale (never below the resize size the transform needs): faster for big photos, pixels
slightly different (see benchmarks/README.md). ``torchvision`` decodes plain JPEGs with
``torchvision.io.decode_jpeg`` on the model's device (nvJPEG, batched, on CUDA) and resizes
there; other files, JPEGs with an EXIF rotation, CMYK JPEGs and transforms with an
interpolation tensors lack use the ``pil`` path. Pillow and torchvision both use
libjpeg-turbo, so on the CPU ``torchvision`` is no faster; the CUDA path is untested here.

Under torchrun (an initialised process group with more than one process) every rank
predicts the files ``rank::world_size`` of the list; after each batch the ranks send their
rows to rank 0, which yields them all in input order (the other ranks yield nothing, but
must still iterate to the end).
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.data.listing import PathList, Warn, discover, warn_stderr
from toolkit.errors import TkError

if TYPE_CHECKING:
    import torch

    from toolkit.model.loading import LoadedModel

DECODERS = ("pil", "draft", "torchvision")




_TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

# sample kinds inside a collated batch
_TENSOR, _RAW, _ERROR = 0, 1, 2


def default_workers() -> int:
    """``min(4, usable CPU cores)``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus))


@dataclass
class Prediction:
    """One row: a file (``path``) or one tensor of a batch (``path`` None)."""

    path: str | None
    label: str | None
    score: float | None
    topk: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    index: int = -1  # position in the input list

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The jsonl row: ``{"path","label","score","topk":[{"label","score"}],"error"}``."""
        return {"path": self.path, "label": self.label, "score": self.score,
                "topk": [{"label": lab, "score": s} for lab, s in self.topk],
                "error": self.error}


class InferenceDataset:
    """``(index, kind, payload)`` for the files ``paths[i]``, ``i`` in ``indices``.

    ``kind`` is ``_TENSOR`` (payload: the preprocessed tensor), ``_RAW`` (payload: the bytes
    of a JPEG for the device decoder) or ``_ERROR`` (payload: the one-line reason). Never
    raises for a bad file."""

    def __init__(self, paths: PathList, indices: Sequence[int], transform: Any,
                 decode: str = "pil"):
        self.paths = paths
        self.indices = indices
        self.transform = transform
        self.decode = decode
        self.draft_size = getattr(transform, "draft_size", None) if decode == "draft" else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, int, Any]:
        index = self.indices[i]
        path = self.paths[index]
        try:
            _check_regular(path)
            if self.decode == "torchvision":
                raw = _plain_jpeg_bytes(path)
                if raw is not None:
                    return index, _RAW, raw
            return index, _TENSOR, self._tensor(path)
        except TkError as exc:
            return index, _ERROR, getattr(exc, "reason", None) or str(exc)
        except Exception as exc:  # a decoder bug must not end the run
            return index, _ERROR, f"cannot preprocess: {type(exc).__name__}: {exc}"


    def _tensor(self, path: str) -> torch.Tensor:
        from toolkit.data.decode import load_image

        img = load_image(path, draft_size=self.draft_size)
        if isinstance(self.transform, SplitEvalTransform):
            return self.transform.pil_stage(img)
        return self.transform(img)


class SplitEvalTransform:
    """:class:`toolkit.data.transforms.EvalTransform` cut in two: in the workers, PIL
    image -> resized, centre-cropped ``uint8 [3,H,W]`` (the same calls as the eval
    transform); on the device, a batch -> ``float``, ``/ 255``, normalised. The same
    operations in the same order as ``EvalTransform.__call__``, so the tensors are
    bit-identical, while workers hand over and the host copies to the GPU a quarter of the
    bytes."""

    def __init__(self, transform: Any):
        self.transform = transform
        self.draft_size = transform.draft_size

    def pil_stage(self, img: Any) -> torch.Tensor:
        import numpy as np
        import torch
        from torchvision.transforms import functional as F

        from toolkit.data.transforms import _interpolation

        t = self.transform
        size = [t.resize_size] if isinstance(t.resize_size, int) else list(t.resize_size)
        img = F.resize(img, size, interpolation=_interpolation(t.interpolation),
                       antialias=True)
        img = F.center_crop(img, list(t.crop_size))
        arr = np.array(img, dtype=np.uint8, copy=True)  # H, W, 3
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def tensor_stage(self, batch: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as F

        x = batch.float().div_(255)
        return F.normalize(x, list(self.transform.mean), list(self.transform.std),
                           inplace=True)


def preprocess(source: str | os.PathLike[str] | bytes, transform: Any, *,
               draft_size: int | None = None) -> torch.Tensor:
    """``transform(load_image(source))``: the exact tensor a file gives (``pil`` decoder;
    with ``draft_size`` the ``draft`` one). Raises ``ImageDecodeError``."""
    from toolkit.data.decode import load_image

    return transform(load_image(source, draft_size=draft_size))


def _check_regular(path: str) -> None:
    from toolkit.data.decode import ImageDecodeError

    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(path, "not a regular file")


def _plain_jpeg_bytes(path: str) -> Any:
    """The file's bytes as a uint8 tensor when torchvision can decode it exactly like
    :func:`toolkit.data.decode.load_image` would (baseline RGB / grey JPEG, no EXIF rotation,
    within the pixel limit); ``None`` otherwise (the PIL path then handles it)."""
    import torch

    from toolkit.data.decode import max_image_pixels

    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            w, h = img.size
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if w * h > max_image_pixels() or w <= 0 or h <= 0:
                return None
            if int(img.getexif().get(0x0112, 1) or 1) != 1:
                return None
    except Exception:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def collate(items: list[tuple[int, int, Any]]) -> dict[str, Any]:
    """Keep every sample's index and kind; stack the decoded tensors, list the rest."""
    import torch

    tensors = [p for _, k, p in items if k == _TENSOR]
    return {
        "index": torch.tensor([i for i, _, _ in items], dtype=torch.long),
        "kind": [k for _, k, _ in items],
        "images": torch.stack(tensors) if tensors else None,
        "raw": [p for _, k, p in items if k == _RAW],
        "errors": [p if k == _ERROR else None for _, k, p in items],
    }


class Predictor:
    """A loaded model on a device, ready to predict files or tensors.

    The model of ``loaded`` is moved to ``device`` (in place) and put in eval mode."""

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 32, topk: int = 1,
                 device: str | torch.device = "auto", precision: str = "32",
                 channels_last: bool = False, workers: int | None = None,
                 decode: str = "pil", warn: Warn = warn_stderr):
        import torch

        from toolkit.data.transforms import EvalTransform, eval_transform
        from toolkit.devices import check_precision, resolve_device

        if int(batch_size) < 1:
            raise TkError(f"--batch-size must be at least 1, got {batch_size}")
        if int(topk) < 1:
            raise TkError(f"--topk must be at least 1, got {topk}")
        if workers is not None and int(workers) < 0:
            raise TkError(f"--workers must be 0 or more, got {workers}")
        if decode not in DECODERS:
            raise TkError(f"--decode {decode}: expected one of {', '.join(DECODERS)}")
        self.loaded = loaded
        self.classes = list(loaded.classes)
        self.batch_size = int(batch_size)
        self.topk = min(int(topk), len(self.classes))
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision = check_precision(precision, self.device)
        self.channels_last = bool(channels_last)
        self.workers = default_workers() if workers is None else int(workers)
        self.transform = eval_transform(loaded.data_config)
        self.split = (SplitEvalTransform(self.transform)
                      if isinstance(self.transform, EvalTransform) else None)
        if decode == "torchvision" and loaded.data_config.interpolation not in \
                _TENSOR_INTERPOLATIONS:
            warn(f"--decode torchvision: interpolation '{loaded.data_config.interpolation}' "
                 "has no tensor version; decoding with PIL")
            decode = "pil"
        self.decode = decode
        model = loaded.model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()

    # tensors ---------------------------------------------------------------------------
    def _launch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward a batch already on the device; top-k probabilities, still on it."""
        import torch

        from toolkit.devices import autocast

        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = self.model(x)
        with torch.inference_mode():
            probs = logits.float().softmax(dim=1)
            values, idx = probs.topk(self.topk, dim=1)
        return values, idx

    def _rows(self, values: torch.Tensor, idx: torch.Tensor) -> list[list[tuple[str, float]]]:
        vals = values.cpu().tolist()
        ids = idx.cpu().tolist()
        return [[(self.classes[c], round(float(v), 6)) for v, c in zip(vr, cr, strict=True)]
                for vr, cr in zip(vals, ids, strict=True)]

    def predict_tensors(self, images: torch.Tensor) -> list[Prediction]:
        """Rows for preprocessed images ``[N,3,H,W]`` (``path`` None, ``index`` = row)."""
        from toolkit.devices import to_device

        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise TkError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
        out: list[Prediction] = []
        for start in range(0, images.shape[0], self.batch_size):
            x = to_device(images[start:start + self.batch_size].float(), self.device,
                          self.channels_last)
            for j, top in enumerate(self._rows(*self._launch(x))):
                out.append(Prediction(None, top[0][0], top[0][1], top, None, start + j))
        return out

    # files -----------------------------------------------------------------------------
    def _device_decode(self, raw: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """Decode JPEG bytes on the device and preprocess there; a string for a failure."""
        from torchvision.io import ImageReadMode, decode_jpeg

        results: list[torch.Tensor | str] = []
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
        except Exception:
            decoded = None
        for i, data in enumerate(raw):
            img = decoded[i] if decoded is not None else None
            try:
                if img is None:  # the batch failed: retry this one alone, then with PIL
                    try:
                        img = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                    except Exception:
                        results.append(preprocess(data.numpy().tobytes(), self.transform)
                                       .to(self.device))
                        continue
                results.append(_tensor_eval_transform(img, self.transform))
            except TkError as exc:
                results.append(getattr(exc, "reason", None) or str(exc))
            except Exception as exc:
                results.append(f"cannot decode: {type(exc).__name__}: {exc}")
        return results

    def _batch_input(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, list[int],
                                                            list[str | None]]:
        """The device tensor for a batch, the batch positions of its rows, the errors."""
        import torch

        from toolkit.devices import to_device

        kinds: list[int] = batch["kind"]
        errors: list[str | None] = list(batch["errors"])
        parts: list[torch.Tensor] = []
        positions: list[int] = []
        if batch["images"] is not None:
            x = to_device(batch["images"], self.device, self.channels_last)
            if x.dtype == torch.uint8 and self.split is not None:
                x = self.split.tensor_stage(x)
            parts.append(x)
            positions += [p for p, k in enumerate(kinds) if k == _TENSOR]
        if batch["raw"]:
            raw_pos = [p for p, k in enumerate(kinds) if k == _RAW]
            good = []
            for p, res in zip(raw_pos, self._device_decode(batch["raw"]), strict=True):
                if isinstance(res, str):
                    errors[p] = res
                else:
                    good.append(res)
                    positions.append(p)
            if good:
                x = torch.stack(good)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                parts.append(x)
        if not parts:
            return None, [], errors
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x, positions, errors

    def _loader(self, paths: PathList, indices: Sequence[int]) -> Any:
        from torch.utils.data import DataLoader

        from toolkit.devices import pin_memory

        dataset = InferenceDataset(paths, indices, self.split or self.transform, self.decode)
        workers = min(self.workers, math.ceil(len(indices) / self.batch_size))
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs["prefetch_factor"] = 4
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False,  # type: ignore
                          num_workers=workers, collate_fn=collate,
                          pin_memory=pin_memory(self.device), **kwargs)

    def _local_rows(self, paths: PathList, indices: Sequence[int]
                    ) -> Iterator[list[Prediction]]:
        """Rows of ``paths[i] for i in indices``, one list per batch, in order."""
        if not len(indices):
            return
        pending: tuple[Any, ...] | None = None
        for batch in self._loader(paths, indices):
            x, positions, errors = self._batch_input(batch)
            launched = self._launch(x) if x is not None else None
            if pending is not None:
                yield self._finish(paths, *pending)
            pending = (batch["index"].tolist(), positions, errors, launched)
        if pending is not None:
            yield self._finish(paths, *pending)

    def _finish(self, paths: PathList, index: list[int], positions: list[int],
                errors: list[str | None], launched: Any) -> list[Prediction]:
        rows: list[Prediction | None] = [None] * len(index)
        if launched is not None:
            for p, top in zip(positions, self._rows(*launched), strict=True):
                rows[p] = Prediction(paths[index[p]], top[0][0], top[0][1], top, None,
                                     index[p])
        for p, err in enumerate(errors):
            if rows[p] is None:
                rows[p] = Prediction(paths[index[p]], None, None, [], err or "not predicted",
                                     index[p])
        return rows  # type: ignore[return-value]

    def predict_paths(self, paths: PathList | Sequence[str]) -> Iterator[Prediction]:
        """One row per path, in order (distributed: see the module doc)."""
        import torch.distributed as dist

        if not isinstance(paths, PathList):
            paths = PathList(paths)
        n = len(paths)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world <= 1:
            for rows in self._local_rows(paths, range(n)):
                yield from rows
            return
        rank = dist.get_rank()
        mine = range(rank, n, world)
        rounds = math.ceil(math.ceil(n / world) / self.batch_size)
        local = self._local_rows(paths, mine)
        for _ in range(rounds):
            rows = next(local, [])
            gathered: list[Any] = [None] * world if rank == 0 else []
            dist.gather_object(rows, gathered if rank == 0 else None, dst=0)
            if rank == 0:
                longest = max(len(r) for r in gathered)
                for j in range(longest):
                    for r in range(world):
                        if j < len(gathered[r]):
                            yield gathered[r][j]
        for _ in local:  # nothing should be left; keep the loader's shutdown orderly
            pass


def _tensor_interpolation(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return {"nearest": InterpolationMode.NEAREST, "bicubic": InterpolationMode.BICUBIC
            }.get(name, InterpolationMode.BILINEAR)


def _tensor_eval_transform(img: torch.Tensor, transform: Any) -> torch.Tensor:
    """The eval transform on a decoded uint8 ``[3,H,W]`` tensor (on any device): resize
    with antialiasing, rounded to 8 bits like PIL, centre crop, scale, normalise."""
    from torchvision.transforms import functional as F

    rs = transform.resize_size
    size = [rs] if isinstance(rs, int) else list(rs)
    x = img.float()
    x = F.resize(x, size, interpolation=_tensor_interpolation(transform.interpolation),
                 antialias=True).round_().clamp_(0, 255)
    x = F.center_crop(x, list(transform.crop_size)).div_(255)
    return F.normalize(x, list(transform.mean), list(transform.std))


def predict(loaded: LoadedModel, inputs: str | os.PathLike[str] | Iterable[Any], *,
            batch_size: int = 32, topk: int = 1, device: str = "auto", precision: str = "32",
            channels_last: bool = False, workers: int | None = None, decode: str = "pil",
            warn: Warn = warn_stderr) -> Iterator[Prediction]:
    """Rows for every image under ``inputs`` (files, folders, globs; see
    :mod:`toolkit.data.listing`), in input order. Bad files give rows with ``error`` set."""
    paths = inputs if isinstance(inputs, PathList) else discover(
        inputs if isinstance(inputs, (str, os.PathLike)) else list(inputs), warn=warn)
    predictor = Predictor(loaded, batch_size=batch_size, topk=topk, device=device,
                          precision=precision, channels_last=channels_last, workers=workers,
                          decode=decode, warn=warn)
    return predictor.predict_paths(paths)


def predict_tensors(loaded: LoadedModel, images: torch.Tensor, *, topk: int = 1,
                    device: str = "auto", precision: str = "32", channels_last: bool = False,
                    batch_size: int = 256) -> list[Prediction]:
    """Rows for images already preprocessed with the model's eval transform."""
    predictor = Predictor(loaded, batch_size=batch_size, topk=topk, device=device,
                          precision=precision, channels_last=channels_last, workers=0)
    return predictor.predict_tensors(images)
