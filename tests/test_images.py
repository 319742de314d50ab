"""toolkit.data.decode.load_image: every supported format to RGB, broken files and bombs refused."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from toolkit.data.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    is_image_path,
    load_image,
    max_image_pixels,
)
from toolkit.errors import DataError, TkError

W, H = 20, 12  # non-square: a transposed result would show
RED, BLUE = (220, 20, 20), (20, 20, 220)


def close(actual, expected, tol=12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def halves(left_colour, right_colour, mode="RGB") -> Image.Image:
    """W x H image: left half one colour, right half another."""
    img = Image.new(mode, (W, H), left_colour)
    img.paste(Image.new(mode, (W // 2, H), right_colour), (W // 2, 0))
    return img


def assert_rgb(img: Image.Image, size=(W, H)) -> None:
    assert img.mode == "RGB"
    assert img.size == size


# -- valid files of every listed format ---------------------------------------------


@pytest.mark.parametrize("name, save", [
    ("a.png", {}),
    ("a.jpg", {"quality": 95}),
    ("a.jpeg", {"quality": 95}),
    ("a.bmp", {}),
    ("a.gif", {}),
    ("a.webp", {"lossless": True}),
    ("a.tif", {}),
    ("a.TIFF", {"compression": "tiff_deflate"}),
])
def test_rgb_formats_decode_with_colours(tmp_path: Path, name: str, save: dict) -> None:
    path = tmp_path / name
    halves(RED, BLUE).save(path, **save)
    img = load_image(path)
    assert_rgb(img)
    assert close(img.getpixel((1, H // 2)), RED, 16)
    assert close(img.getpixel((W - 2, H // 2)), BLUE, 16)


def test_grey_and_one_bit(tmp_path: Path) -> None:
    Image.new("L", (W, H), 77).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert_rgb(img)
    assert img.getpixel((0, 0)) == (77, 77, 77)
    halves(0, 1, mode="1").save(tmp_path / "b.png")
    img = load_image(tmp_path / "b.png")
    assert_rgb(img)
    assert img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((W - 1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path, ext: str) -> None:
    img16 = halves(1000, 65535, mode="I;16")
    path = tmp_path / f"deep.{ext}"
    img16.save(path)
    img = load_image(path)
    assert_rgb(img)
    assert img.getpixel((0, 0)) == (4, 4, 4)  # 1000 / 65535 * 255, a clip would give 255
    assert img.getpixel((W - 1, 0)) == (255, 255, 255)


def test_32_bit_int_and_float_images(tmp_path: Path) -> None:
    Image.new("I", (W, H), 32768).save(tmp_path / "i.tif")
    assert load_image(tmp_path / "i.tif").getpixel((0, 0)) == (128, 128, 128)
    Image.new("F", (W, H), 0.5).save(tmp_path / "f.tif")
    img = load_image(tmp_path / "f.tif")
    assert_rgb(img)
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    img = load_image(tmp_path / "c.jpg")
    assert_rgb(img)
    assert close(img.getpixel((W // 2, H // 2)), (255, 0, 0), 12)


def test_palette_png_with_transparency_goes_over_white(tmp_path: Path) -> None:
    pal = Image.new("P", (W, H), 0)
    pal.putpalette([0, 0, 0, 20, 20, 220] + [0] * (256 * 3 - 6))
    pal.paste(1, (W // 2, 0, W, H))
    pal.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert_rgb(img)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((W - 1, 0)) == BLUE
    # a black background on request
    assert load_image(tmp_path / "p.png", background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode, colour, expected", [
    ("RGBA", (220, 20, 20, 255), RED),
    ("LA", (90, 255), (90, 90, 90)),
])
def test_alpha_is_composited(tmp_path: Path, mode: str, colour, expected) -> None:
    transparent = tuple(colour[:-1]) + (0,)
    img = halves(transparent, colour, mode=mode)
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert_rgb(out)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((W - 1, 0)) == expected


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (W, H), RED), Image.new("RGB", (W, H), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50,
                   loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    img = load_image(tmp_path / "anim.gif")
    assert_rgb(img)
    assert close(img.getpixel((3, 3)), RED, 8)


def test_exif_orientation_6_rotates_upright(tmp_path: Path) -> None:
    img = halves(RED, BLUE)  # stored 20 x 12: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "o.jpg")
    assert_rgb(out, (H, W))
    assert close(out.getpixel((H // 2, 1)), RED, 16)  # the left side is now on top
    assert close(out.getpixel((H // 2, W - 2)), BLUE, 16)


def test_content_decides_not_extension(tmp_path: Path) -> None:
    halves(RED, BLUE).save(tmp_path / "really_png.jpg", format="PNG")
    img = load_image(tmp_path / "really_png.jpg")
    assert_rgb(img)
    assert img.getpixel((0, 0)) == RED


def test_bytes_input() -> None:
    buf = io.BytesIO()
    halves(RED, BLUE).save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((W - 1, 0)) == BLUE


def test_draft_decodes_big_jpegs_smaller(tmp_path: Path) -> None:
    Image.new("RGB", (800, 600), RED).save(tmp_path / "big.jpg")
    small = load_image(tmp_path / "big.jpg", draft_size=100)
    assert min(small.size) >= 100 and small.size[0] < 800
    assert load_image(tmp_path / "big.jpg").size == (800, 600)
    Image.new("RGB", (800, 600), RED).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", draft_size=100).size == (800, 600)


# -- broken files ------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_image(b"")


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        load_image(tmp_path / "cut.jpg")
    assert str(tmp_path / "cut.jpg") in str(info.value)
    assert "\n" not in str(info.value)


def test_text_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    with pytest.raises(ImageDecodeError, match="not an image") as info:
        load_image(tmp_path / "notes.jpg")
    assert isinstance(info.value, DataError) and isinstance(info.value, TkError)
    assert info.value.path == str(tmp_path / "notes.jpg")


def test_unsupported_format_is_refused(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", format="PPM")  # decodable, not listed
    with pytest.raises(ImageDecodeError, match="not a supported format"):
        load_image(tmp_path / "x.png")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(tmp_path)


# -- decompression bombs -------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def test_bomb_refused_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    with pytest.raises(ImageDecodeError, match="too large") as info:
        load_image(tmp_path / "bomb.png")
    assert "\n" not in str(info.value)
    # just above our own limit but below Pillow's hard one: our check refuses it
    side = int(DEFAULT_MAX_PIXELS ** 0.5) + 1
    with pytest.raises(ImageDecodeError, match=f"{side}x{side}"):
        load_image(bomb_png(side, side))


def test_pixel_limit_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    monkeypatch.setenv("TK_MAX_IMAGE_PIXELS", "1000")
    assert max_image_pixels() == 1000
    with pytest.raises(ImageDecodeError, match="64x64 = 4096 pixels exceeds the limit of 1000"):
        load_image(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png", max_pixels=4096).size == (64, 64)
    monkeypatch.setenv("TK_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(TkError, match="TK_MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "ok.png")
    monkeypatch.delenv("TK_MAX_IMAGE_PIXELS")
    assert max_image_pixels() == DEFAULT_MAX_PIXELS


# -- extensions ------------------------------------------------------------------------


def test_extreme_aspect_ratio_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    """A few hundred bytes of PNG, 200000x1 pixels: far under the pixel limit, but its
    resize for any model would be gigabytes. Refused from the header."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (200_000, 1), (10, 20, 30)).save(path)
    assert path.stat().st_size < 2000
    with pytest.raises(ImageDecodeError, match="extreme aspect ratio: 200000x1 is more "
                                               "than 100:1"):
        load_image(path)
    Image.new("RGB", (100, 1)).save(tmp_path / "ok.png")  # 100:1 is allowed
    assert load_image(tmp_path / "ok.png").size == (100, 1)
    monkeypatch.setenv("TK_MAX_ASPECT_RATIO", "1000000")
    assert load_image(path).size == (200_000, 1)
    monkeypatch.setenv("TK_MAX_ASPECT_RATIO", "wide")
    with pytest.raises(TkError, match="TK_MAX_ASPECT_RATIO"):
        load_image(path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import faulthandler
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    faulthandler.dump_traceback_later(30, exit=True)  # a hang fails the run
    try:
        with pytest.raises(ImageDecodeError, match="not a regular file \\(a FIFO\\)"):
            load_image(fifo)
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_extensions_case_insensitive() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == set(
        IMAGE_EXTENSIONS)
    assert is_image_path("a/B.JPG") and is_image_path("x.TiFf") and is_image_path(Path("y.webp"))
    assert not is_image_path("notes.txt") and not is_image_path("jpg")


# -- fuzz: mutated real image bytes -------------------------------------------------


def _seed_files() -> list[bytes]:
    out = []
    base = halves(RED, BLUE)
    for fmt, kw in (("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}),
                    ("WEBP", {})):
        buf = io.BytesIO()
        base.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_files()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(SEEDS) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_mutated_images_never_crash(which: int, edits, cut) -> None:
    data = bytearray(SEEDS[which])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        img = load_image(bytes(data), max_pixels=1_000_000)
    except ImageDecodeError as exc:
        assert "\n" not in str(exc) and exc.reason
    else:
        assert img.mode == "RGB" and img.width * img.height <= 1_000_000
