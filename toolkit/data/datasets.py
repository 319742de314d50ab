"""Generic datasets every dataset plugin can hand back: file lists and generated samples.

Nothing here knows a concrete dataset; plugins (``plugins/datasets.py``) list files or
generate images and wrap them in the classes below.

- :class:`DatasetSource` — what a dataset factory returns (classes, ``splits``).
- :class:`ImageListDataset` — ``(path, label)`` samples decoded by
  :func:`toolkit.data.decode.load_image`; :class:`MultiLabelListDataset` — the same with
  ``(path, (label, ...))`` samples and multi-hot targets; :class:`IndexedDataset` —
  generated samples.

Training data must be clean: an image that cannot be decoded stops training with a
:class:`TrainingImageError` naming the file (rather than silently training on less data).
Listing is by extension only, so a bad file is found when it is first read; ``tk infer``
is the tool that keeps going past bad files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch.utils.data import Dataset

from toolkit.data.decode import ImageDecodeError, load_image
from toolkit.data.transforms import ImageShapeError, Transform
from toolkit.errors import DataError


@runtime_checkable
class DatasetSource(Protocol):
    """What a dataset factory returns (see ``tk_register_datasets``).

    ``classes``: class names, index = label. ``splits`` returns ``(train, val)`` datasets
    of ``(image_tensor, label)`` with ``train_transform`` applied to the training part and
    ``eval_transform`` to the validation part. Sources backed by files may also expose
    ``samples``: a list of ``(path, label)``. A multi-label source says
    ``task = "multi-label"``; its datasets give multi-hot float targets ``[C]``.
    """

    classes: list[str]

    def splits(
        self, train_transform: Transform, eval_transform: Transform, *, val_split: float,
        seed: int,
    ) -> tuple[Any, Any]: ...


class TrainingImageError(DataError):
    """A training / validation image that cannot be decoded.

    Raised inside DataLoader workers too: torch re-creates the exception in the main
    process with the worker's traceback as message; the constructor keeps only the
    original one-line message so the CLI still prints one clean line.
    """

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if "\n" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


class ImageListDataset(Dataset):
    """``(image_tensor, label)`` for a list of ``(path, label)`` samples.

    Images are decoded by :func:`toolkit.data.decode.load_image` (EXIF orientation, colour modes,
    size and aspect limits exactly as at inference). A file that fails to decode, or whose
    resize the transform refuses, raises :class:`TrainingImageError` naming it.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform | None = None):
        self.samples = [(str(p), int(label)) for p, label in samples]
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            img = load_image(path)
            return (self.transform(img) if self.transform is not None else img), label
        except ImageDecodeError as exc:
            reason = str(exc)
        except ImageShapeError as exc:  # the eval transform's bound on what its resize makes
            reason = f"{path}: {exc}"
        raise TrainingImageError(
            f"cannot read training image {reason}; training data must be readable: fix or "
            f"remove the file")


class IndexedDataset(Dataset):
    """``(transform(image), label)`` from a generator ``make(i) -> (PIL image, label)`` over
    the given indices (synthetic data). ``make`` must be picklable for worker processes."""

    def __init__(self, make: Callable[[int], tuple[Any, int]], indices: Sequence[int],
                 transform: Transform | None = None):
        self.make = make
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.make(self.indices[index])
        return (self.transform(img) if self.transform is not None else img), int(label)


class MultiLabelListDataset(ImageListDataset):
    """``(image_tensor, multi-hot float32 [num_classes])`` for ``(path, (label, ...))``
    samples (an image may have no label at all)."""

    def __init__(self, samples: Sequence[tuple[str, Sequence[int]]], num_classes: int,
                 transform: Transform | None = None):
        self.samples = [(str(p), tuple(int(x) for x in labels))  # type: ignore[misc]
                        for p, labels in samples]
        self.transform = transform
        self.num_classes = int(num_classes)

    @property
    def targets(self) -> list[tuple[int, ...]]:  # type: ignore[override]
        return [labels for _, labels in self.samples]  # type: ignore[misc]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch

        image, labels = super().__getitem__(index)
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        if labels:
            target[list(labels)] = 1.0
        return image, target
