"""Data plumbing shared by every dataset plugin: transforms, splits, datasets, loaders.

Nothing here knows a concrete dataset; plugins (``plugins/datasets.py``) list files or
generate images and hand them to the generic datasets below.

- :func:`eval_transform` — deterministic preprocessing from a backbone's
  :class:`~toolkit.backbone.DataConfig` (resize, centre crop, normalise); inference uses the
  very same object.
- :func:`train_transform` — the training augmentation (documented there).
- :func:`stratified_split` — a seeded per-class train/validation split.
- :class:`ImageListDataset` — ``(path, label)`` samples decoded by
  :func:`toolkit.images.load_image`; :class:`IndexedDataset` — generated samples.
- :func:`make_loader` — a ``DataLoader`` whose shuffling and worker seeds follow ``seed``.

Training data must be clean: an image that cannot be decoded stops training with a
:class:`TrainingImageError` naming the file (rather than silently training on less data).
Listing is by extension only, so a bad file is found when it is first read; ``tk infer``
is the tool that keeps going past bad files.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset

from toolkit.backbone import DataConfig
from toolkit.errors import DataError
from toolkit.images import ImageDecodeError, load_image

Transform = Callable[[Any], Any]

__all__ = [
    "DatasetSource",
    "EvalTransform",
    "ImageListDataset",
    "IndexedDataset",
    "TrainTransform",
    "TrainingImageError",
    "eval_transform",
    "make_loader",
    "stratified_split",
    "train_transform",
]


@runtime_checkable
class DatasetSource(Protocol):
    """What a dataset factory returns (see ``tk_register_datasets``).

    ``classes``: class names, index = label. ``splits`` returns ``(train, val)`` datasets
    of ``(image_tensor, label)`` with ``train_transform`` applied to the training part and
    ``eval_transform`` to the validation part. Sources backed by files may also expose
    ``samples``: a list of ``(path, label)``.
    """

    classes: list[str]

    def splits(
        self, train_transform: Transform, eval_transform: Transform, *, val_split: float,
        seed: int,
    ) -> tuple[Any, Any]: ...


# -- transforms ------------------------------------------------------------------------


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {
        "nearest": InterpolationMode.NEAREST,
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "lanczos": InterpolationMode.LANCZOS,
        "box": InterpolationMode.BOX,
        "hamming": InterpolationMode.HAMMING,
    }.get(name, InterpolationMode.BILINEAR)


class EvalTransform:
    """PIL RGB image -> normalised float tensor ``[3, H, W]``, deterministically.

    Square inputs: the short side is resized to ``int(size / crop_pct)`` keeping the aspect
    ratio; non-square inputs are resized to ``(int(H / crop_pct), int(W / crop_pct))``.
    Then a centre crop of ``(H, W)``, conversion to ``[0, 1]`` and ``(x - mean) / std``.
    A plain object of numbers and strings, so DataLoader workers can pickle it.
    """

    def __init__(self, data_config: DataConfig):
        _, h, w = data_config.input_size
        self.crop_size = (int(h), int(w))
        crop_pct = float(data_config.crop_pct) or 1.0
        if h == w:
            self.resize_size: int | tuple[int, int] = int(math.floor(h / crop_pct))
        else:
            self.resize_size = (int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct)))
        self.interpolation = data_config.interpolation
        self.mean = tuple(float(m) for m in data_config.mean)
        self.std = tuple(float(s) for s in data_config.std)

    @property
    def draft_size(self) -> int:
        """The smallest short side the resize needs (for reduced-size JPEG decoding)."""
        rs = self.resize_size
        return rs if isinstance(rs, int) else max(rs)

    def __call__(self, img: Any) -> torch.Tensor:
        from torchvision.transforms import functional as F

        size = [self.resize_size] if isinstance(self.resize_size, int) else list(
            self.resize_size)
        img = F.resize(img, size, interpolation=_interpolation(self.interpolation),
                       antialias=True)
        img = F.center_crop(img, list(self.crop_size))
        return F.normalize(F.to_tensor(img), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"EvalTransform(resize={self.resize_size}, crop={self.crop_size}, "
                f"interpolation={self.interpolation}, mean={self.mean}, std={self.std})")


class TrainTransform:
    """Training augmentation: PIL RGB image -> normalised float tensor ``[3, H, W]``.

    1. random resized crop to ``(H, W)``: a crop covering ``scale`` (default 50-100 %) of
       the image area with aspect ratio 3/4-4/3, resized with the config's interpolation;
    2. horizontal flip with probability 0.5;
    3. light colour jitter: brightness, contrast and saturation each by up to +-``jitter``
       (default 0.2), no hue change;
    4. conversion to ``[0, 1]`` and normalisation with the config's mean / std.

    Randomness comes from torch's global generator (seeded per DataLoader worker by
    :func:`make_loader`), so seeded runs repeat.
    """

    def __init__(self, data_config: DataConfig, *, scale: tuple[float, float] = (0.5, 1.0),
                 jitter: float = 0.2, flip: float = 0.5):
        _, h, w = data_config.input_size
        self.size = (int(h), int(w))
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (3 / 4, 4 / 3)
        self.jitter = float(jitter)
        self.flip = float(flip)
        self.interpolation = data_config.interpolation
        self.mean = tuple(float(m) for m in data_config.mean)
        self.std = tuple(float(s) for s in data_config.std)

    def __call__(self, img: Any) -> torch.Tensor:
        from torchvision import transforms as T
        from torchvision.transforms import functional as F

        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale),
                                                         list(self.ratio))
        img = F.resized_crop(img, top, left, h, w, list(self.size),
                             interpolation=_interpolation(self.interpolation), antialias=True)
        if self.flip > 0 and torch.rand(1).item() < self.flip:
            img = F.hflip(img)
        if self.jitter > 0:
            lo, hi = max(0.0, 1 - self.jitter), 1 + self.jitter
            factors = torch.empty(3).uniform_(lo, hi).tolist()
            order = torch.randperm(3).tolist()
            adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
            for k in order:
                img = adjust[k](img, factors[k])
        return F.normalize(F.to_tensor(img), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, flip={self.flip}, "
                f"jitter={self.jitter}, interpolation={self.interpolation})")


def eval_transform(data_config: DataConfig) -> EvalTransform:
    """The deterministic preprocessing for ``data_config`` (validation, eval, inference)."""
    return EvalTransform(data_config)


def train_transform(data_config: DataConfig, *, augment: bool = True) -> Transform:
    """The training transform; ``augment=False`` gives :func:`eval_transform` instead."""
    return TrainTransform(data_config) if augment else EvalTransform(data_config)


# -- splits ----------------------------------------------------------------------------


def stratified_split(
    labels: Sequence[int], val_split: float, seed: int, *,
    class_names: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` of a seeded split that keeps class proportions.

    Each class sends ``round(n * val_split)`` of its ``n`` samples to validation, at least
    one and at most ``n - 1``; which ones depends only on ``seed``, the class and its
    members (not on other classes). Both lists come back sorted.

    Raises :class:`DataError` when ``val_split`` is not strictly between 0 and 1 or a class
    has fewer than 2 samples (it could not be in both parts); ``class_names`` makes that
    message name the class.
    """
    try:
        frac = float(val_split)
    except (TypeError, ValueError):
        raise DataError(f"--val-split must be a number between 0 and 1, got {val_split!r}") \
            from None
    if not 0.0 < frac < 1.0 or math.isnan(frac):
        raise DataError(f"--val-split must be between 0 and 1 (exclusive), got {val_split}")
    by_class: dict[int, list[int]] = {}
    for idx, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(idx)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        if n < 2:
            name = (class_names[label] if class_names is not None and 0 <= label < len(
                class_names) else str(label))
            raise DataError(
                f"class '{name}' has only {n} image; at least 2 are needed to split it into "
                f"training and validation (add images, or give an explicit validation folder)"
            )
        n_val = min(n - 1, max(1, int(round(n * frac))))
        order = list(members)
        random.Random(f"tk-split:{seed}:{label}:{n}").shuffle(order)
        val.extend(order[:n_val])
        train.extend(order[n_val:])
    return sorted(train), sorted(val)


# -- datasets --------------------------------------------------------------------------


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

    Images are decoded by :func:`toolkit.images.load_image` (EXIF orientation, colour modes
    and size limits exactly as at inference). A file that fails to decode raises
    :class:`TrainingImageError` naming it.
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
        except ImageDecodeError as exc:
            raise TrainingImageError(
                f"cannot read training image {exc}; training data must be readable: fix or "
                f"remove the file"
            ) from None
        return (self.transform(img) if self.transform is not None else img), label


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


# -- loaders ---------------------------------------------------------------------------


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a worker from torch's per-worker seed
    (torch sets it to the loader's base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch installs
        pass


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    sampler: Any = None,
) -> DataLoader:
    """A ``DataLoader`` that repeats exactly for a given ``seed``.

    Shuffling uses a ``torch.Generator`` seeded with ``seed`` (also the source of the
    workers' base seed); each worker seeds ``random`` / NumPy from its torch seed.
    ``workers > 0`` keeps the workers alive across epochs. With a ``sampler`` (e.g. a
    ``DistributedSampler``) ``shuffle`` is left to the sampler.
    """
    if int(batch_size) < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if int(workers) < 0:
        raise DataError(f"--workers must be 0 or more, got {workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=_seed_worker, prefetch_factor=4)
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=bool(shuffle) if sampler is None else False,
        sampler=sampler,
        num_workers=int(workers),
        pin_memory=bool(pin_memory),
        drop_last=bool(drop_last),
        generator=generator,
        **kwargs,
    )
