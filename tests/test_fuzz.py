"""Property-based fuzzing (hypothesis) of the two readers of files from outside tk.

1. :func:`toolkit.data.decode.load_image` — the one decoding path of `tk infer`, `tk eval` and
   `tk finetune` — on mutated real image bytes: PNG, JPEG, GIF, WebP, BMP and TIFF files in
   several colour modes, written by Pillow, then bytes flipped, set, inserted, deleted,
   duplicated, header integers overwritten (PNG chunk CRCs optionally repaired so the edit
   reaches the decoder), the file truncated. The result is an RGB image within the pixel
   limit or a one-line :class:`toolkit.errors.TkError` (``ImageDecodeError``).
   ``tests/test_images.py::test_mutated_images_never_crash`` already covers byte edits
   and truncation; this adds the other mutations, more seed images, decoding from a path
   and the ``TK_MAX_IMAGE_PIXELS`` limit from the environment.
2. The model store (:class:`model_store.ModelStore`) on mutated files: bytes of the
   safetensors header edited (list / show / verify / load), and the tk metadata JSON
   edited structurally then re-sealed with a valid checksum (so that only the metadata
   checks and the registry stand between it and torch). Every call either works or raises
   :class:`toolkit.errors.StoreError` / ``TkError``.

No hang: a watchdog (``faulthandler.dump_traceback_later(..., exit=True)``, a C thread that
fires even while a decoder is stuck in C code) ends the whole run with the stuck stack if
one example takes longer than :data:`HANG_S`. Bounded memory: the pixel limit is set low.
"""

from __future__ import annotations

import atexit
import faulthandler
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from PIL import Image

from model_store import ModelStore
from model_store.fileformat import seal, serialize
from toolkit.data.decode import ImageDecodeError, load_image
from toolkit.errors import TkError
from toolkit.model.loading import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "plugins_for_tests" / "tiny.py")
HANG_S = 60  # one example running this long is a hang, not slowness
PIXEL_LIMIT = 40_000  # TK_MAX_IMAGE_PIXELS while fuzzing: 200x200
FUZZ = settings(max_examples=600, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """Kill the test process, printing every thread's stack, if a test hangs."""
    faulthandler.dump_traceback_later(HANG_S * 4, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


def _rearm() -> None:
    """Per example: restart the watchdog's clock."""
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.stderr)


@pytest.fixture(scope="module", autouse=True)
def low_pixel_limit() -> Iterator[None]:
    old = os.environ.get("TK_MAX_IMAGE_PIXELS")
    os.environ["TK_MAX_IMAGE_PIXELS"] = str(PIXEL_LIMIT)
    yield
    if old is None:
        os.environ.pop("TK_MAX_IMAGE_PIXELS", None)
    else:
        os.environ["TK_MAX_IMAGE_PIXELS"] = old


# -- seed images ---------------------------------------------------------------------------


def _picture(mode: str = "RGB", size: tuple[int, int] = (16, 12)) -> Image.Image:
    img = Image.new("RGB", size, (220, 20, 20))
    img.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
    img.paste((20, 200, 20), (0, size[1] // 2, size[0] // 3, size[1]))
    return img if mode == "RGB" else img.convert(mode)


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    rgba = _picture("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: exercises the orientation path
    grey16 = Image.new("I;16", (16, 12))
    grey16.putdata([i * 500 for i in range(16 * 12)])
    frames = [_picture(), _picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    palette = _picture("P")
    return {
        "png-rgb": _save(_picture(), "PNG"),
        "png-rgba": _save(rgba, "PNG"),
        "png-palette-transparent": _save(palette, "PNG", transparency=0),
        "png-grey16": _save(grey16, "PNG"),
        "png-1bit": _save(_picture("1"), "PNG"),
        "jpeg-rgb-exif": _save(_picture(), "JPEG", exif=exif.tobytes(), quality=80),
        "jpeg-grey-progressive": _save(_picture("L"), "JPEG", progressive=True),
        "jpeg-cmyk": _save(_picture("CMYK"), "JPEG"),
        "gif-animated": _save(frames[0], "GIF", save_all=True, append_images=frames[1:],
                              duration=50, loop=0),
        "webp-lossy": _save(_picture(), "WEBP", quality=70),
        "webp-lossless-rgba": _save(rgba, "WEBP", lossless=True),
        "bmp-rgb": _save(_picture(), "BMP"),
        "bmp-palette": _save(palette, "BMP"),
        "tiff-rgb": _save(_picture(), "TIFF"),
        "tiff-lzw": _save(_picture(), "TIFF", compression="tiff_lzw"),
        "tiff-deflate-grey16": _save(grey16, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-multipage": _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
    }


SEEDS = _seeds()
SEED_NAMES = sorted(SEEDS)
INTERESTING = (0, 1, 2, 7, 8, 15, 16, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 100_000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def test_seed_images_decode_unmutated() -> None:
    """The seeds are real, valid images: the fuzzing starts from files that decode."""
    for name, data in SEEDS.items():
        img = load_image(data)
        assert img.mode == "RGB" and img.size in ((16, 12), (12, 16)), name


# -- mutations ----------------------------------------------------------------------------

_pos = st.integers(0, 1 << 16)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("set"), _pos, st.integers(0, 255)),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
    st.tuples(st.just("repeat"), _pos, st.integers(1, 64), _pos),
    # a header field: an integer of 1, 2 or 4 bytes, either byte order, in the first bytes
    st.tuples(st.just("int"), st.integers(0, 127), st.sampled_from((1, 2, 4)),
              st.sampled_from(("<", ">")), st.sampled_from(INTERESTING)),
    st.tuples(st.just("truncate"), _pos),
)


def mutate(data: bytes, ops: list[tuple], fix_png_crc: bool) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        kind, pos = op[0], op[1] % len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << op[2]
        elif kind == "set":
            buf[pos] = op[2]
        elif kind == "insert":
            buf[pos:pos] = op[2]
        elif kind == "delete":
            del buf[pos : pos + op[2]]
        elif kind == "repeat":
            chunk = bytes(buf[pos : pos + op[2]])
            at = op[3] % (len(buf) + 1)
            buf[at:at] = chunk
        elif kind == "int":
            width, order, value = op[2], op[3], op[4]
            code = {1: "B", 2: "H", 4: "I"}[width]
            packed = struct.pack(order + code, value & ((1 << (8 * width)) - 1))
            at = op[1] % max(1, len(buf) - width + 1)
            buf[at : at + width] = packed
        elif kind == "truncate":
            del buf[pos:]
    out = bytes(buf)
    return _repair_png_crcs(out) if fix_png_crc else out


def _repair_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk CRC, so a mutated chunk passes the CRC check and the
    decoder itself meets the edited content."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out = bytearray(data)
    i = 8
    while i + 12 <= len(out):
        n = int.from_bytes(out[i : i + 4], "big")
        end = i + 8 + n
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[i + 4 : end])))
        i = end + 4
    return bytes(out)


def _check_image_result(data: bytes, path: Path | None) -> None:
    source = path if path is not None else data
    try:
        img = load_image(source)
    except ImageDecodeError as exc:
        assert "\n" not in str(exc) and exc.reason
        _event(f"refused: {exc.reason.split('(')[0].split(':')[0].strip()}")
        return
    except TkError as exc:  # any other tk error is acceptable too, as one line
        assert "\n" not in str(exc)
        return
    assert img.mode == "RGB"
    assert 0 < img.width * img.height <= PIXEL_LIMIT
    img.tobytes()  # fully decoded: no lazy failure later
    _event("decoded")


def _event(what: str) -> None:
    """Count an outcome (`pytest --hypothesis-show-statistics` shows the mix)."""
    try:
        event(what)
    except InvalidArgument:  # called outside a hypothesis example
        pass


_TMP = Path(tempfile.mkdtemp(prefix="tk-fuzz-"))
atexit.register(shutil.rmtree, _TMP, True)


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), ops=st.lists(MUTATION, min_size=1, max_size=6),
       fix_png_crc=st.booleans(), via_path=st.booleans(),
       ext=st.sampled_from((".png", ".jpg", ".gif", ".webp", ".bmp", ".tif", ".txt")))
def test_mutated_image_bytes_decode_or_raise_one_tk_error(name: str, ops: list, fix_png_crc: bool,
                                                          via_path: bool, ext: str) -> None:
    _rearm()
    data = mutate(SEEDS[name], ops, fix_png_crc)
    path = None
    if via_path:  # the path branch: empty files, the name in the message, any extension
        path = _TMP / f"img{ext}"
        path.write_bytes(data)
    _check_image_result(data, path)


# (bit depth, colour type) pairs PNG allows, so that most edits get past identification
PNG_MODES = ((1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3),
             (4, 3), (8, 3), (8, 4), (16, 4), (8, 6), (16, 6))
_dimension = st.one_of(st.sampled_from(INTERESTING), st.integers(1, 400))


@FUZZ
@given(name=st.sampled_from([n for n in SEED_NAMES if n.startswith("png")]),
       width=_dimension, height=_dimension,
       mode=st.one_of(st.sampled_from(PNG_MODES),
                      st.tuples(st.sampled_from((0, 3, 7, 255)), st.integers(0, 255))))
def test_png_header_fields_with_valid_crc(name: str, width: int, height: int,
                                          mode: tuple[int, int]) -> None:
    """IHDR rewritten with any width, height, bit depth and colour type, CRC repaired:
    lying headers (bombs included) are refused before decoding, never crash."""
    _rearm()
    data = bytearray(SEEDS[name])
    data[16:26] = struct.pack(">IIBB", width, height, *mode)
    data = _repair_png_crcs(bytes(data))
    _check_image_result(data, None)


# -- the model store ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugins():
    from toolkit.plugin.manager import load_plugins

    return load_plugins(modules=[TINY], env={})


@pytest.fixture(scope="module")
def seed_store(plugins, tmp_path_factory) -> Path:
    """A store with one plain model ("full") and one on a shared base ("shared")."""
    import torch

    from toolkit.model.assemble import ModelSpec, build_classifier

    root = tmp_path_factory.mktemp("seed-store")
    torch.manual_seed(0)
    spec = ModelSpec("tiny:tiny-cnn", 3, backbone_options={"width": 4})
    model, backbone = build_classifier(plugins, spec, pretrained=False)
    meta = {"spec": spec.to_dict(), "classes": ["cat", "dog", "eel"],
            "data_config": backbone.data_config.to_dict(),
            "training": {"epochs": 1}, "metrics": {"val_acc": 0.5, "history": [{"epoch": 1}]},
            "weights": backbone.weights.to_dict()}
    store = ModelStore(root)
    store.save("full", model, meta)
    store.save("shared", model, meta, shared_prefix="backbone.")
    return root


STORE_CALLS = ("list", "damaged", "verify_all", "verify", "info", "show", "load")


def _exercise_store(store: ModelStore, name: str, plugins) -> dict[str, str]:
    """Call every reader; each must work or raise a TkError (StoreError). Returns what
    each call did, for the assertion message."""
    outcome: dict[str, str] = {}
    for call in STORE_CALLS:
        try:
            if call == "list":
                store.list()
            elif call == "damaged":
                store.damaged()
            elif call == "verify_all":
                store.verify()
            elif call == "verify":
                store.verify(name)
            elif call == "info":
                store.info(name)
            elif call == "show":
                json.dumps(store.show(name), allow_nan=True)
            elif call == "load":
                loaded = load_model(name, store, plugins=plugins)
                assert len(loaded.classes) == loaded.spec.num_classes
            outcome[call] = "ok"
        except TkError as exc:
            assert "\n" not in str(exc), (call, str(exc))
            outcome[call] = f"{type(exc).__name__}: {exc}"
    _event(f"load: {outcome['load'].split(' (')[0][:60]}")
    return outcome


def _fresh_copy(seed_store: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="tk-fuzz-store-"))
    shutil.rmtree(target)
    shutil.copytree(seed_store, target)
    return target


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(("full", "shared")),
       ops=st.lists(MUTATION, min_size=1, max_size=4), in_header=st.booleans())
def test_mutated_model_file_bytes(seed_store: Path, plugins, which: str, ops: list,
                                  in_header: bool) -> None:
    """Bytes of a stored model edited (mostly inside the safetensors header): readers
    that skip the checksum (list, info, show) meet the damaged header directly."""
    _rearm()
    root = _fresh_copy(seed_store)
    try:
        path = root / "models" / f"{which}.safetensors"
        data = path.read_bytes()
        n = 8 + int.from_bytes(data[:8], "little")
        if in_header:  # keep positions inside the header (and its length field)
            ops = [(op[0], op[1] % n, *op[2:]) if op[0] != "int" else op for op in ops]
        path.write_bytes(mutate(data, ops, fix_png_crc=False))
        _exercise_store(ModelStore(root), which, plugins)
    finally:
        shutil.rmtree(root, ignore_errors=True)


JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(("os:system", "__import__('os').system('touch pwned')", "../../etc/passwd",
                     "tiny:tiny-cnn", "linear", "", "builtins:eval", "subprocess:Popen",
                     "0" * 64, "2024-01-01T00:00:00+00:00")),
)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
# paths into the metadata worth editing (plus random ones)
META_PATHS = (
    ("spec",), ("spec", "backbone"), ("spec", "backbone", "name"),
    ("spec", "backbone", "options"), ("spec", "backbone", "options", "width"),
    ("spec", "head"), ("spec", "head", "name"), ("spec", "head", "options"),
    ("spec", "head", "options", "dropout"), ("spec", "num_classes"), ("classes",),
    ("classes", 0), ("data_config",), ("data_config", "input_size"),
    ("data_config", "input_size", 1), ("data_config", "mean"), ("data_config", "std", 0),
    ("data_config", "crop_pct"), ("data_config", "interpolation"), ("training",),
    ("metrics",), ("weights",), ("base",), ("base", "sha256"), ("base", "prefix"),
    ("shared",), ("shared", "blobs"), ("shared", "tensors"),
    ("format_version",), ("created",), ("name",), ("tk_version",),
)
EDIT = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(META_PATHS), JSON_VALUE),
    st.tuples(st.just("delete"), st.sampled_from(META_PATHS), st.none()),
    st.tuples(st.just("set"), st.sampled_from(META_PATHS), st.sampled_from(INTERESTING)),
)


def _edit(meta: dict, path: tuple, value: object, delete: bool) -> None:
    node: object = meta
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        if delete:
            del node[last]
        else:
            node[last] = value


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(("full", "shared")), edits=st.lists(EDIT, min_size=1, max_size=3))
def test_edited_metadata_with_valid_checksum(seed_store: Path, plugins, which: str,
                                             edits: list) -> None:
    """The tk metadata JSON edited (values replaced by any JSON, keys deleted) and the
    file re-sealed: the metadata is data; a bad edit is a StoreError, never a crash, and
    nothing named in it is executed."""
    _rearm()
    from safetensors import safe_open

    root = _fresh_copy(seed_store)
    try:
        path = root / "models" / f"{which}.safetensors"
        with safe_open(str(path), "pt") as fh:
            file_meta = dict(fh.metadata())
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = json.loads(file_meta["tk"])
        for kind, where, value in edits:
            _edit(meta, where, value, kind == "delete")
        file_meta["tk"] = json.dumps(meta, allow_nan=True)
        file_meta.pop("tk_digest", None)
        chunks, _ = seal(serialize(tensors, file_meta))
        path.write_bytes(b"".join(bytes(c) for c in chunks))
        cwd = os.getcwd()
        os.chdir(root)  # a payload that ran would drop 'pwned' here
        try:
            _exercise_store(ModelStore(root), which, plugins)
        finally:
            os.chdir(cwd)
        assert not (root / "pwned").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_metadata_fuzz_reaches_the_loader(seed_store: Path, plugins) -> None:
    """Sanity check of the harness: an unedited re-sealed copy loads, so the property
    above does exercise load() and not only the checksum."""
    root = _fresh_copy(seed_store)
    try:
        outcome = _exercise_store(ModelStore(root), "shared", plugins)
        assert outcome == {call: "ok" for call in STORE_CALLS}
        assert math.isfinite(ModelStore(root).list()[0].metrics["val_acc"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
