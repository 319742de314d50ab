"""The images an export is checked and calibrated on, as the exported graph sees them.

Sources, in the order ``tk export`` prefers them:

1. the stored model's own data, rebuilt from its metadata (``training.dataset``,
   ``training.dataset_options``, ``val_split``, ``seed``) through the dataset plugins: the
   validation split for the parity check, the training split for int8 calibration;
2. ``--calibrate DIR``: the images under DIR (labelled when its sub-folders are the model's
   class names);
3. synthetic: smooth random colour fields, for the fp32 parity check only (a stated
   fallback when no real image is reachable; int8 calibration refuses it).

Every image is decoded by :func:`toolkit.data.decode.load_image` and cut by the model's eval
transform into the ``uint8 [3,H,W]`` crop the exported graph takes; the eager reference
logits come from the same image through the whole eval transform (float, normalised), the
tensors ``tk infer`` feeds the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import DataError, TkError

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

    from toolkit.model.loading import LoadedModel

Log = Callable[[str], None]


@dataclass
class ImageSet:
    """Crops as the exported graph takes them, with labels and eager logits when known."""

    crops: np.ndarray  # uint8 [N,3,H,W]
    labels: list[int] | None  # class index per image, None when unlabelled
    eager: np.ndarray | None  # float32 [N,classes]: the eager model on the same images
    source: str  # where the images came from, for the summary and the metadata

    def __len__(self) -> int:
        return len(self.crops)

    def batches(self, size: int = 32) -> Iterator[np.ndarray]:
        for i in range(0, len(self.crops), size):
            yield self.crops[i:i + size]


def spread(n: int, k: int) -> list[int]:
    """At most ``k`` indices spread evenly over ``range(n)`` (every class of a sorted list
    gets its share)."""
    if n <= k:
        return list(range(n))
    return [i * n // k for i in range(k)]


def identity(img: Any) -> Any:
    """The transform handed to a dataset so that it returns its decoded PIL images."""
    return img


def training_splits(loaded: LoadedModel, plugins: Any) -> tuple[Any, Any, str]:
    """``(train, val, description)``: the stored model's own training and validation data,
    yielding ``(PIL image, label)``, rebuilt from its metadata; raises :class:`TkError`
    saying why when it is no longer reachable."""
    training = loaded.meta.get("training") or {}
    name = training.get("dataset")
    if not name:
        raise DataError("its metadata does not name its training dataset")
    options = dict(training.get("dataset_options") or {})
    component = plugins.registry("datasets").resolve(name)
    source = component.factory(**options)
    if list(source.classes) != list(loaded.classes):
        raise DataError(f"dataset {name} now has other classes than the model")
    train, val = source.splits(identity, identity, val_split=training.get("val_split", 0.2),
                               seed=training.get("seed", 0))
    where = options.get("path") or training.get("data")
    return train, val, f"{component.name}{f' {where}' if where else ''}"


def from_dataset(dataset: Any, k: int, warn: Log) -> Iterator[tuple[Image, int | None]]:
    """Up to ``k`` ``(PIL image, label)`` spread over ``dataset``; unreadable ones skipped."""
    from PIL.Image import Image as PILImage

    for i in spread(len(dataset), k):
        try:
            img, label = dataset[i]
        except DataError as exc:
            warn(f"{exc} (skipped)")
            continue
        if not isinstance(img, PILImage):
            raise DataError(f"the dataset returns {type(img).__name__}, not PIL images, "
                            "given an identity transform")
        # a multi-label target (multi-hot) is no single class: no accuracy is reported
        yield img, int(label) if getattr(label, "ndim", 0) == 0 and not isinstance(
            label, (tuple, list)) else None


def folder_images(folder: str | os.PathLike[str], classes: list[str]
                  ) -> tuple[list[str], list[int] | None]:
    """The images under ``folder`` (listed like `tk infer` lists them) and, when every one
    sits in a sub-folder named after one of ``classes``, their labels."""
    from toolkit.data.listing import discover

    root = Path(folder)
    if not root.is_dir():
        raise TkError(f"--calibrate {folder}: not a folder of images")
    paths = list(discover([str(root)], warn=lambda _m: None))
    if not paths:
        raise TkError(f"--calibrate {folder}: no image files in it (extensions: jpg jpeg png "
                      "bmp gif webp tif tiff)")
    index = {c: i for i, c in enumerate(classes)}
    labels: list[int] | None = []
    for p in paths:
        parts = Path(p).relative_to(root).parts
        if len(parts) < 2 or parts[0] not in index:
            labels = None
            break
        labels.append(index[parts[0]])  # type: ignore[union-attr]
    return paths, labels


def from_folder(paths: list[str], labels: list[int] | None, k: int, warn: Log
                ) -> Iterator[tuple[Image, int | None]]:
    from toolkit.data.decode import ImageDecodeError, load_image

    for i in spread(len(paths), k):
        try:
            img = load_image(paths[i])
        except ImageDecodeError as exc:
            warn(f"{exc} (skipped)")
            continue
        yield img, (labels[i] if labels is not None else None)


def synthetic(n: int, size: int, seed: int = 0) -> Iterator[tuple[Image, None]]:
    """``n`` smooth random colour fields of ``size`` px (bilinear upsampling of 4x4 noise,
    plus a little pixel noise): deterministic, unlabelled."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        field = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), np.int16)
        noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        yield Image.fromarray(noisy), None


def crop_function(transform: Any) -> Callable[[Image], np.ndarray]:
    """The host half of tk's eval transform: PIL image -> ``uint8 [3,H,W]`` crop (the
    resize and centre crop ``tk infer``'s workers make; the graph does the rest)."""
    crop = getattr(transform, "crop", None)
    if crop is not None:  # EvalTransform.crop: Pillow + numpy, [H,W,3]
        return lambda img: crop(img).transpose(2, 0, 1)
    from toolkit.predict.runner import SplitEvalTransform  # before the host half moved

    host = SplitEvalTransform(transform)
    return lambda img: host.pil_stage(img).numpy()


def collect(images: Iterable[tuple[Image, int | None]], source: str, *, loaded: LoadedModel,
            eager: bool = True, chunk: int = 32) -> ImageSet:
    """Crops (and, with ``eager``, the eager model's logits through the full eval
    transform) of ``images``."""
    import numpy as np
    import torch

    from toolkit.data.transforms import eval_transform

    transform = eval_transform(loaded.data_config)
    host_crop = crop_function(transform)
    crops: list[np.ndarray] = []
    labels: list[int | None] = []
    logits: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            with torch.inference_mode():
                logits.append(loaded.model(torch.stack(pending)).float().cpu().numpy())
            pending.clear()

    for img, label in images:
        crops.append(host_crop(img))
        labels.append(label)
        if eager:
            pending.append(transform(img))
            if len(pending) >= chunk:
                flush()
    flush()
    if not crops:
        raise DataError(f"no readable image in {source}")
    _, h, w = loaded.data_config.input_size
    return ImageSet(
        crops=np.stack(crops).reshape(len(crops), 3, h, w),
        labels=None if any(lab is None for lab in labels) else [int(x) for x in labels],
        eager=np.concatenate(logits) if eager else None,
        source=source)
