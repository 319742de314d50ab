"""The one image loading path of tk: training, evaluation and inference all decode here.

:func:`load_image` turns a file (or its bytes) into a fully decoded ``PIL.Image`` in RGB,
whatever the file holds, or raises :class:`ImageDecodeError` with a one-line reason:

- the format is found from the content, never from the extension (a PNG named ``.jpg``
  loads); only the formats tk documents are decoded (JPEG/MPO, PNG, BMP, GIF, WebP, TIFF):
  other Pillow plugins (EPS through Ghostscript, exotic decoders) are never reached;
- the EXIF orientation is applied (a photo taken sideways comes out upright);
- palette, grey, 1-bit, CMYK, YCbCr images are converted to RGB; images with alpha (RGBA,
  LA, palette or grey with a transparent colour) are composited over a solid background,
  **white** by default (``background=``); 16-bit images (``I;16*``) are scaled to 8 bits
  (``v * 255 / 65535``, rounded), never clipped; 32-bit integer images whose values fit in
  16 bits are scaled the same way, others (and float images) are stretched from their
  minimum to their maximum; animated GIF / WebP and multi-page TIFF give their first frame;
- decompression bombs are refused from the size the header declares, before any pixel is
  decoded: more than ``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS`, Pillow's
  own default, or ``TK_MAX_IMAGE_PIXELS`` from the environment);
- so are extreme aspect ratios (long side more than :data:`DEFAULT_MAX_ASPECT_RATIO` times
  the short one, or ``TK_MAX_ASPECT_RATIO``): a 666-byte PNG of 200000x1 pixels is tiny,
  but resizing its short side to a model's input would make an image of gigabytes. (The
  eval transform also bounds what its resize produces, see
  :meth:`toolkit.data.transforms.EvalTransform.output_size`.) Training and inference both
  decode here, so they refuse the same files;
- only regular files are opened (a FIFO named ``x.jpg`` is refused without blocking);
- empty, truncated, corrupt or non-image files raise :class:`ImageDecodeError`; the image is
  decoded completely inside the function (no lazy decoding that fails later).

``draft_size`` asks for reduced-size JPEG decoding (libjpeg's DCT scaling by 1/2, 1/4 or
1/8) while keeping the short side at least that many pixels: much faster for photos far
larger than the model input, and a no-op for other formats or small JPEGs.

PIL is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import TYPE_CHECKING

from toolkit.errors import DataError

if TYPE_CHECKING:
    from PIL import Image as PILImage

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
)
"""File name endings tk treats as images when it lists folders (case-insensitive)."""

DECODE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
"""Pillow format names :func:`load_image` decodes ("JPEG" includes MPO, the multi-picture
JPEG many cameras write). Anything else is refused as 'not a supported image'."""

DEFAULT_MAX_PIXELS = 89_478_485
"""Largest image (width x height) decoded unless ``TK_MAX_IMAGE_PIXELS`` says otherwise
(Pillow's default: about 0.25 GB of RGB pixels)."""

MAX_PIXELS_ENV = "TK_MAX_IMAGE_PIXELS"

DEFAULT_MAX_ASPECT_RATIO = 100
"""Largest ratio of an image's long side to its short side (panoramas and banners stay far
below; a 200000x1 strip does not)."""

MAX_ASPECT_ENV = "TK_MAX_ASPECT_RATIO"

ImageSource = str | os.PathLike | bytes | bytearray | memoryview


class ImageDecodeError(DataError):
    """A file that cannot be decoded as an image; ``str()`` is one line:
    ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = " ".join(str(reason).split())  # one line, always
        super().__init__(f"{path}: {self.reason}")

    def __reduce__(self):  # keep (path, reason) through pickling (DataLoader workers)
        return (type(self), (self.path, self.reason))


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether the file name ends with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def max_image_pixels() -> int:
    """The pixel limit: ``TK_MAX_IMAGE_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`."""
    from toolkit import env

    return env.integer(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, minimum=1)


def max_aspect_ratio() -> int:
    """The aspect limit: ``TK_MAX_ASPECT_RATIO`` if set, else :data:`DEFAULT_MAX_ASPECT_RATIO`."""
    from toolkit import env

    return env.integer(MAX_ASPECT_ENV, DEFAULT_MAX_ASPECT_RATIO, minimum=1)


def check_limits() -> None:
    """Read the size limits from the environment once, so that a malformed value is one
    usage error before any work instead of an error row per file."""
    max_image_pixels()
    max_aspect_ratio()


_pil_ready = False


def pil():
    """Import Pillow once and align its own bomb check with ours (we check first, from the
    header; Pillow's warning is silenced, its hard limit raised to ours when ours is
    higher)."""
    global _pil_ready
    from PIL import Image

    if not _pil_ready:
        # register only the decoders tk accepts (Image.init() would import all ~45 format
        # plugins, ~20 ms in every fresh DataLoader worker)
        from PIL import (  # noqa: F401
            BmpImagePlugin,
            GifImagePlugin,
            JpegImagePlugin,
            MpoImagePlugin,
            PngImagePlugin,
            TiffImagePlugin,
            WebPImagePlugin,
        )
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        Image.preinit()  # the few plugins Image.open imports itself, now rather than later
        _pil_ready = True
    return Image


# EXIF orientation -> the transpose that makes the image upright
_ORIENTATION_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM",
                          5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = None,
    draft_size: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> PILImage.Image:
    """Decode ``source`` (a path or the file's bytes) into an RGB ``PIL.Image``.

    ``max_pixels``: refuse images larger than this (default :func:`max_image_pixels`).
    ``draft_size``: allow reduced-size JPEG decoding down to this short side.
    ``background``: the colour transparent pixels are composited over.

    Raises :class:`ImageDecodeError` (one line, naming the file) for anything that is not
    a decodable image of a supported format within the size limit.
    """
    Image = pil()
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        data = bytes(source)
        if not data:
            raise ImageDecodeError(name, "empty file (0 bytes)")
        return _decode(Image, io.BytesIO(data), name, limit, draft_size, background)

    name = os.fspath(source)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    fh = open_regular(name)
    with fh:
        try:
            size = os.fstat(fh.fileno()).st_size
        except OSError:
            size = -1
        if size == 0:
            raise ImageDecodeError(name, "empty file (0 bytes)")
        return _decode(Image, fh, name, limit, draft_size, background)


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """Open ``path`` for reading if it is a regular file (after links); raise
    :class:`ImageDecodeError` otherwise. Opened non-blocking and checked on the open file,
    so a FIFO (or a file swapped for one) never blocks."""
    import stat

    name = os.fsdecode(os.fspath(path))
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise ImageDecodeError(name, "is a directory, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(name, f"cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageDecodeError(name, "is a directory, not an image file")
        if not stat.S_ISREG(mode):
            raise ImageDecodeError(name, f"not a regular file ({_file_kind(mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    import stat

    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


def plain_jpeg_bytes(path: str | os.PathLike) -> bytes | None:
    """The file's bytes when a plain JPEG decoder (nvJPEG through torchvision) decodes it
    exactly as :func:`load_image` would: baseline RGB or grey JPEG, no EXIF rotation, within
    the size limits. ``None`` otherwise (then :func:`load_image` handles it). Raises
    :class:`ImageDecodeError` for a file that cannot be read."""
    with open_regular(path) as fh:
        data = fh.read()
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    Image = pil()
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            w, h = img.size
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if w <= 0 or h <= 0 or w * h > max_image_pixels():
                return None
            if max(w, h) > max_aspect_ratio() * min(w, h):
                return None
            if int(img.getexif().get(0x0112, 1) or 1) != 1:
                return None
    except Exception:
        return None
    return data


def _decode(Image, fp, name: str, limit: int, draft_size: int | None,
            background: tuple[int, int, int]) -> PILImage.Image:
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # our own check below is the one that counts
    try:
        img = Image.open(fp, formats=DECODE_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own check (2x its limit) fired
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageDecodeError(name, _too_large(found.group(1) if found else "its", limit)
                               ) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            name, "not an image, or not a supported format "
            "(JPEG, PNG, BMP, GIF, WebP, TIFF)") from None
    except Exception as exc:  # corrupt headers make Pillow raise all sorts of things
        raise ImageDecodeError(name, f"corrupt image header ({_describe(exc)})") from None

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(name, f"image has no pixels ({width}x{height})")
    if width * height > limit:
        raise ImageDecodeError(name, _too_large(f"{width}x{height} = {width * height}", limit))
    aspect = max_aspect_ratio()
    if max(width, height) > aspect * min(width, height):
        raise ImageDecodeError(
            name, f"extreme aspect ratio: {width}x{height} is more than {aspect}:1 (its "
            f"resize for a model would be huge; raise {MAX_ASPECT_ENV} to allow it), "
            "refused before decoding")
    fmt = img.format or "image"
    if draft_size and fmt in ("JPEG", "MPO") and img.mode in ("RGB", "L", "CMYK"):
        try:
            img.draft(img.mode, (int(draft_size), int(draft_size)))
        except Exception:  # a draft is an optimisation only
            pass
    try:
        img.load()
    except Exception as exc:
        raise ImageDecodeError(
            name, f"corrupt or truncated {fmt} data ({_describe(exc)})") from None
    orientation = _orientation(img)
    try:
        rgb = _to_rgb(Image, img, background)
    except Exception as exc:
        raise ImageDecodeError(
            name, f"cannot convert {fmt} mode {img.mode} to RGB ({_describe(exc)})"
        ) from None
    if orientation in _ORIENTATION_TRANSPOSE:
        rgb = rgb.transpose(getattr(Image.Transpose, _ORIENTATION_TRANSPOSE[orientation]))
    return rgb


def _too_large(pixels: str, limit: int) -> str:
    return (f"image too large: {pixels} pixels exceeds the limit of {limit} (possible "
            f"decompression bomb; raise {MAX_PIXELS_ENV} to allow it), refused before decoding")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _orientation(img) -> int:
    """The EXIF orientation (1 when absent or unreadable: a broken EXIF block does not
    make a valid picture unusable)."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:
        return 1


def _to_rgb(Image, img, background: tuple[int, int, int]):
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(Image, img)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, tuple(background))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode in ("RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr", "HSV"):
        return img.convert("RGB")
    # anything else Pillow can convert (e.g. "LAB" raises here and is reported as such)
    return img.convert("RGB")


def _high_depth_to_rgb(Image, img):
    """16-bit / 32-bit integer / float grey images -> 8-bit RGB without clipping."""
    import numpy as np

    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"unexpected array shape {arr.shape}")
    if img.mode.startswith("I;16"):
        scaled = (arr.astype(np.uint32) * 255 + 32767) // 65535
    else:
        a = arr.astype(np.float64)
        finite = np.isfinite(a)
        lo = float(a[finite].min()) if finite.any() else 0.0
        hi = float(a[finite].max()) if finite.any() else 0.0
        if img.mode == "I" and lo >= 0 and hi <= 65535:
            scaled = (np.nan_to_num(a) * 255 + 32767) // 65535
        elif img.mode == "F" and lo >= 0 and hi <= 1.0:
            scaled = np.rint(np.nan_to_num(a) * 255)
        elif hi > lo:
            scaled = np.rint((np.clip(np.nan_to_num(a, nan=lo), lo, hi) - lo) * 255 / (hi - lo))
        else:
            scaled = np.zeros_like(a)
    grey = Image.fromarray(np.ascontiguousarray(scaled.astype(np.uint8)))  # 2-D uint8: "L"
    return grey.convert("RGB")
