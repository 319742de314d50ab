"""The ``textures`` dataset: generated on the fly, deterministic, nothing to download."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from tk_textures.patterns import class_names, texture_image
from toolkit.errors import TkError


class TextureImages(Dataset):
    """``(image_tensor, label)`` for a list of ``(label, index)`` pairs; images are drawn
    when asked for, so the dataset costs no memory and works with DataLoader workers."""

    def __init__(self, items: list[tuple[int, int]], transform: Callable[[Any], torch.Tensor],
                 size: int, seed: int):
        self.items = items
        self.transform = transform
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label, index = self.items[i]
        return self.transform(texture_image(label, index, self.size, self.seed)), label


class TexturesSource:
    """What tk expects from a dataset factory: ``classes`` and ``splits(...)``."""

    def __init__(self, num_classes: int = 4, per_class: int = 48, size: int = 40, seed: int = 0):
        if int(per_class) < 2:
            raise TkError("dataset 'textures': per_class must be at least 2")
        if int(size) < 8:
            raise TkError("dataset 'textures': size must be at least 8 pixels")
        self.classes = class_names(int(num_classes))
        self.per_class = int(per_class)
        self.size = int(size)
        self.seed = int(seed)

    def splits(self, train_transform: Callable[[Any], torch.Tensor],
               eval_transform: Callable[[Any], torch.Tensor], *, val_split: float = 0.2,
               seed: int | None = None) -> tuple[TextureImages, TextureImages]:
        """A split stratified by class: the same ``val_split`` share of every class."""
        if not 0.0 <= float(val_split) < 1.0:
            raise TkError(f"dataset 'textures': val_split must be in [0, 1), got {val_split}")
        rng = random.Random(self.seed if seed is None else int(seed))
        train: list[tuple[int, int]] = []
        val: list[tuple[int, int]] = []
        n_val = round(self.per_class * float(val_split))
        if val_split > 0:
            n_val = min(max(n_val, 1), self.per_class - 1)
        for label in range(len(self.classes)):
            indices = list(range(self.per_class))
            rng.shuffle(indices)
            val += [(label, i) for i in indices[:n_val]]
            train += [(label, i) for i in indices[n_val:]]
        return (TextureImages(train, train_transform, self.size, self.seed),
                TextureImages(val, eval_transform, self.size, self.seed))


def textures_dataset(num_classes: int | None = None, per_class: int = 48, size: int = 40,
                     seed: int | None = None, path: str | None = None) -> TexturesSource:
    """The ``textures`` factory. tk passes ``num_classes`` (``--classes``), ``seed`` and
    ``path`` (``--data``, which a generated dataset refuses)."""
    if path is not None:
        raise TkError("dataset 'textures' is generated: it takes no --data path")
    return TexturesSource(num_classes=4 if num_classes is None else num_classes,
                          per_class=per_class, size=size, seed=0 if seed is None else seed)
