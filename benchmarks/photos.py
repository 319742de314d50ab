"""Real-photo JPEGs made offline: crops of the two photographs that scikit-learn ships
(``sklearn/datasets/images/china.jpg`` and ``flower.jpg``, 640x427 each, CC-BY), at
native resolution or smaller (never upscaled), flipped at random and re-encoded as JPEG at
quality 75-95. Used by ``bench_infer.py`` (decoding agreement) and ``accuracy_shapes.py``
(a real-image set). Needs scikit-learn (the ``review`` extra) for the two source files.

    from photos import photo_jpegs
    paths = photo_jpegs(Path("out"), 200, size=(500, 375))               # flat folder
    photo_regions(Path("data"), per_class=60)                           # class folders
"""

from __future__ import annotations

import random
from pathlib import Path


def source_photos() -> list[Path]:
    """The photographs scikit-learn ships (SystemExit when it is not installed)."""
    try:
        import sklearn
    except ImportError:
        raise SystemExit("the real-photo set needs scikit-learn (pip install -e '.[review]')"
                         ) from None
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return sorted(folder.glob("*.jpg"))


def _crop(img, rng: random.Random, out_w: int, out_h: int, box=None):
    """A random crop of ``img`` (inside ``box``) with the aspect of out_w:out_h, at least
    as large as the output, resized down to it."""
    from PIL import Image

    x0, y0, x1, y1 = box or (0, 0, *img.size)
    bw, bh = x1 - x0, y1 - y0
    scale_max = min(bw / out_w, bh / out_h)
    scale = rng.uniform(min(1.0, scale_max), scale_max) if scale_max > 1 else scale_max
    cw, ch = max(1, int(out_w * scale)), max(1, int(out_h * scale))
    left = x0 + rng.randint(0, max(0, bw - cw))
    top = y0 + rng.randint(0, max(0, bh - ch))
    crop = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if crop.size != (out_w, out_h):
        crop = crop.resize((out_w, out_h), Image.Resampling.LANCZOS)
    return crop


def photo_jpegs(out: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0
                ) -> list[Path]:
    """``n`` JPEGs of ``size`` (width, height) cut from the real photographs."""
    from PIL import Image

    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in source_photos()]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = _crop(photos[i % len(photos)], rng, *size)
        path = out / f"photo_{i:05d}.jpg"
        img.save(path, quality=rng.randint(75, 95))
        paths.append(path)
    return paths


def quarters() -> list[tuple[str, object, tuple[int, int, int, int]]]:
    """Each photograph cut in 2x2 regions: ``(name, image, box)`` per region, named
    ``<photo>_<t|b><l|r>`` (8 in all)."""
    from PIL import Image

    out = []
    for src in source_photos():
        img = Image.open(src).convert("RGB")
        w, h = img.size
        for row in range(2):
            for col in range(2):
                name = f"{src.stem}_{'tb'[row]}{'lr'[col]}"
                box = (col * w // 2, row * h // 2, (col + 1) * w // 2, (row + 1) * h // 2)
                out.append((name, img, box))
    return out


def photo_regions(root: Path, per_class: int, size: tuple[int, int] = (160, 120),
                  seed: int = 0) -> list[str]:
    """A labelled real-image set: each photograph cut in 2x2 regions, one class per region
    (8 classes), ``per_class`` JPEG crops of ``size`` from inside each region in
    ``root/<class>/``. Returns the class names."""
    rng = random.Random(seed)
    classes = []
    for name, img, box in quarters():
        classes.append(name)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            crop = _crop(img, rng, *size, box=box)
            crop.save(folder / f"{name}_{i:04d}.jpg", quality=rng.randint(75, 95))
    return classes
