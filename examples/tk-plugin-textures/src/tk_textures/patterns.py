"""Texture images: the pictures behind the ``textures`` dataset and ``tk textures-preview``.

One class per kind of texture. Each image gets a random period, offset, a few degrees of
tilt, a pair of contrasting colours and pixel noise, all drawn from a generator seeded by
``(seed, class, index)``: the same arguments always give the same image. Every kind looks
like itself mirrored left-right, so the usual flip augmentation keeps labels right.
Needs numpy and Pillow, not torch.
"""

from __future__ import annotations

from typing import Any

KINDS: tuple[str, ...] = ("stripes-h", "stripes-v", "checker", "dots", "rings", "grid")
MAX_CLASSES = len(KINDS)


def class_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` kinds (2 to 6)."""
    if not 2 <= num_classes <= MAX_CLASSES:
        from toolkit.errors import TkError

        raise TkError(
            f"dataset 'textures': --classes must be between 2 and {MAX_CLASSES}, "
            f"got {num_classes}"
        )
    return list(KINDS[:num_classes])


def texture_image(label: int, index: int, size: int = 40, seed: int = 0) -> Any:
    """The ``index``-th image of class ``label`` as a PIL RGB image, ``size`` pixels square."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, label, index])
    period = rng.uniform(6.0, 11.0)
    tilt = np.deg2rad(rng.uniform(-6.0, 6.0))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    # coordinates along / across the (slightly tilted) texture, in periods
    a = (xs * np.cos(tilt) + ys * np.sin(tilt)) / period + rng.uniform(0, 1)
    b = (-xs * np.sin(tilt) + ys * np.cos(tilt)) / period + rng.uniform(0, 1)
    kind = KINDS[label]
    if kind == "stripes-h":
        on = (b % 1.0) < 0.5
    elif kind == "stripes-v":
        on = (a % 1.0) < 0.5
    elif kind == "checker":
        on = (np.floor(a) + np.floor(b)) % 2 == 0
    elif kind == "dots":
        radius = rng.uniform(0.2, 0.32)
        on = ((a % 1.0) - 0.5) ** 2 + ((b % 1.0) - 0.5) ** 2 < radius**2
    elif kind == "rings":
        cx, cy = rng.uniform(0, size, 2)
        on = ((np.hypot(xs - cx, ys - cy) / period + rng.uniform(0, 1)) % 1.0) < 0.5
    else:  # grid
        width = rng.uniform(0.15, 0.3)
        on = ((a % 1.0) < width) | ((b % 1.0) < width)
    fg = rng.uniform(150, 255, size=3)
    bg = rng.uniform(0, 100, size=3)
    if rng.random() < 0.5:
        fg, bg = bg, fg
    img = np.where(on[..., None], fg, bg) + rng.normal(0.0, 12.0, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
