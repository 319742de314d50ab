"""The preprocessing of tk: one eval transform (shared by validation, evaluation and every
inference runtime) and the training augmentation, both built from a backbone's
:class:`~toolkit.model.backbone.DataConfig`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from toolkit.model.backbone import DataConfig

Transform = Callable[[Any], Any]


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
