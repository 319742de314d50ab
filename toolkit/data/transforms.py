"""The preprocessing of tk: one eval transform (shared by validation, evaluation and every
inference runtime) and the training augmentation, both built from a backbone's
:class:`~toolkit.model.backbone.DataConfig`.

:class:`EvalTransform` comes in two halves so that every runtime shares the pixels:

- the **host half** :meth:`EvalTransform.crop`: a decoded PIL image -> the resized,
  centre-cropped ``uint8`` numpy array ``[H, W, 3]``, with Pillow and numpy only (no torch:
  the ONNX Runtime path of `tk infer` never imports it). It runs in decoding workers.
- the **device half** :meth:`EvalTransform.normalize`: a ``uint8`` batch tensor
  ``[N, 3, H, W]`` -> ``float32``, ``/ 255``, ``(x - mean) / std``, on the model's device.
- :meth:`EvalTransform.crop_tensor` is the host half for images decoded on the device (the
  nvJPEG path of ``--decode torchvision``): resize with antialiasing, rounded to 8 bits like
  Pillow, centre crop, still ``uint8``.

``EvalTransform(img)`` is both halves one after the other: bit for bit what torchvision's
``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` give for a PIL image (torchvision
resizes PIL images with Pillow itself; tests/test_data.py checks it on real images of
several sizes and interpolations).

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from toolkit.errors import DataError
from toolkit.model.backbone import DataConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

Transform = Callable[[Any], Any]

# interpolation name -> Pillow's resampling filter (Image.Resampling values). torchvision
# functions accept these integers too, so this is the only table.
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4,
                "hamming": 5}
TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
"""Interpolations torchvision can also apply to tensors (the device-decoding path)."""


def resample(name: str) -> int:
    """Pillow's filter for an interpolation name (bilinear for an unknown one)."""
    return PIL_RESAMPLE.get(name, PIL_RESAMPLE["bilinear"])


class ImageShapeError(DataError):
    """An image whose resize for the model would be unreasonably large; the message is one
    line without the file name (the caller, who knows the file, adds it)."""


def resized_size(width: int, height: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` after the eval resize (torchvision's rule): an ``int`` is the
    new short side, the long one scaled and truncated; a pair ``(h, w)`` is taken as is."""
    if not isinstance(size, int):
        return int(size[1]), int(size[0])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


class EvalTransform:
    """Deterministic preprocessing: PIL RGB image -> normalised float tensor ``[3, H, W]``.

    Square inputs: the short side is resized to ``int(size / crop_pct)`` keeping the aspect
    ratio; non-square inputs are resized to ``(int(H / crop_pct), int(W / crop_pct))``.
    Then a centre crop of ``(H, W)`` (zero padding where the image is smaller), conversion
    to ``[0, 1]`` and ``(x - mean) / std``. A plain object of numbers and strings, so
    worker processes can pickle it.
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

    # -- host half (Pillow + numpy only) ---------------------------------------------------
    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of the resized image, before the crop. Raises
        :class:`ImageShapeError` when that image would exceed the decoder's pixel limit
        (``TK_MAX_IMAGE_PIXELS``): work and memory per image stay bounded by what the
        resize produces, not only by what the file declares."""
        from toolkit.data.decode import max_image_pixels

        out_w, out_h = resized_size(width, height, self.resize_size)
        limit = max_image_pixels()
        if out_w * out_h > limit:
            raise ImageShapeError(
                f"a {width}x{height} image resized for this model would be {out_w}x{out_h} "
                f"= {out_w * out_h} pixels, over the limit of {limit}; its aspect ratio is "
                f"too extreme")
        return out_w, out_h

    def crop(self, img: Any) -> np.ndarray:
        """The host half: resize (Pillow) and centre-crop to a ``uint8`` array
        ``[H, W, 3]`` (C-contiguous). Non-RGB images are converted to RGB first."""
        import numpy as np

        if img.mode != "RGB":
            img = img.convert("RGB")
        width, height = img.size
        out_w, out_h = self.output_size(width, height)
        if (out_w, out_h) != (width, height):  # torchvision skips a same-size resize too
            img = img.resize((out_w, out_h), resample(self.interpolation))
        arr = np.asarray(img, dtype=np.uint8)
        return _center_crop(arr, *self.crop_size)

    # -- device half (torch) -------------------------------------------------------------
    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """The device half: ``uint8 [N, 3, H, W]`` (any memory layout, any device) ->
        ``float32``, ``/ 255``, ``(x - mean) / std``: the operations of torchvision's
        ``ToTensor`` and ``Normalize`` in their order, so the values are bit-identical.
        The memory layout is kept (a channels-last batch stays channels-last)."""
        import torch

        x = batch.to(torch.float32).div_(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def crop_tensor(self, img: torch.Tensor) -> torch.Tensor:
        """The host half for an image decoded on the device (``uint8 [3, H, W]``): resize
        with antialiasing (``nearest``, ``bilinear`` or ``bicubic``), rounded to 8 bits
        like Pillow, centre crop; ``uint8 [3, h, w]`` on the same device. Close to
        :meth:`crop`, not bit-identical (Pillow and torch compute the filters differently)."""
        import torch
        from torchvision.transforms import functional as F

        if self.interpolation not in TENSOR_INTERPOLATIONS:
            raise ValueError(f"interpolation '{self.interpolation}' has no tensor version")
        height, width = int(img.shape[-2]), int(img.shape[-1])
        out_w, out_h = self.output_size(width, height)
        x = img
        if (out_w, out_h) != (width, height):
            x = F.resize(img.float(), [out_h, out_w], interpolation=resample(self.interpolation),
                         antialias=True).round_().clamp_(0, 255)
        x = F.center_crop(x, list(self.crop_size))
        return x.to(torch.uint8)

    # -- both ----------------------------------------------------------------------------
    def __call__(self, img: Any) -> torch.Tensor:
        """Both halves: PIL image -> normalised ``float32 [3, H, W]``."""
        import torch

        arr = self.crop(img)
        return self.normalize(torch.from_numpy(arr).permute(2, 0, 1)).contiguous()

    def __repr__(self) -> str:
        return (f"EvalTransform(resize={self.resize_size}, crop={self.crop_size}, "
                f"interpolation={self.interpolation}, mean={self.mean}, std={self.std})")


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """torchvision's ``center_crop`` on an ``[H, W, C]`` array: zero padding (left/top
    ``d // 2``) where the image is smaller than the crop, then offsets
    ``round((size - crop) / 2)``."""
    import numpy as np

    h, w = arr.shape[:2]
    if crop_w > w or crop_h > h:
        pad_l = (crop_w - w) // 2 if crop_w > w else 0
        pad_t = (crop_h - h) // 2 if crop_h > h else 0
        pad_r = (crop_w - w + 1) // 2 if crop_w > w else 0
        pad_b = (crop_h - h + 1) // 2 if crop_h > h else 0
        arr = np.pad(arr, ((pad_t, pad_b), (pad_l, pad_r), (0, 0)))
        h, w = arr.shape[:2]
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return arr[top:top + crop_h, left:left + crop_w].copy()  # C-contiguous, writable


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
        import torch
        from torchvision import transforms as T
        from torchvision.transforms import functional as F

        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale),
                                                         list(self.ratio))
        img = F.resized_crop(img, top, left, h, w, list(self.size),
                             interpolation=resample(self.interpolation), antialias=True)
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
