"""An exported file, torch-free: the tk metadata it carries, and reading and checking it.

``tk export`` writes one file per model (ONNX, a ``torch.export`` ``.pt2`` archive or a
TorchScript archive) that carries what a client needs besides the weights, as string
key/values: ONNX ``metadata_props``, or in the PyTorch archives the extra file
``extra/tk.json`` (a JSON object of the same keys and string values):

==================== ===================================================================
``tk.format_version`` ``"1"`` (this schema)
``tk.format``         ``onnx``, ``pt2`` or ``torchscript``
``tk.precision``      ``fp32`` or ``int8``
``tk.classes``        JSON list of class names, index = output column
``tk.task``           ``single-label`` (softmax over the logits) or ``multi-label``
                      (a sigmoid per class)
``tk.thresholds``     multi-label only: JSON list of per-class decision thresholds on the
                      sigmoid scores (a class is predicted when its score reaches its own)
``tk.preprocess``     JSON: ``input_name``, ``output_name``, ``layout`` (``NCHW``),
                      ``dtype`` (``uint8``), ``channels`` (``RGB``), ``input_size``
                      ``[3,H,W]``, ``resize`` (short side, or ``[h,w]`` for non-square
                      inputs), ``crop`` ``[h,w]``, ``crop_pct``, ``interpolation``,
                      ``mean``, ``std``, ``normalize`` (where the ``/255`` and
                      mean/std happen: ``"in-graph"``)
``tk.calibration``    JSON ``{"method": "temperature", "temperature": T}`` when the stored
                      model has a calibration temperature (``scores = softmax(logits / T)``);
                      absent otherwise
``tk.source``         JSON: the stored model's ``name``, ``sha256`` of its file,
                      ``backbone``, ``head``, ``created``
``tk.parity``         JSON: the check made at export (see ``tk export --help``)
``tk.tk_version``     the tk that wrote the file
``tk.exported``       UTC ISO 8601 time of the export
==================== ===================================================================

The graph takes ``uint8`` pixels ``[N,3,H,W]`` (RGB, already resized and centre-cropped)
and returns logits ``[N,classes]``; the scaling and normalisation are inside it.

:func:`read_export` reads and checks a file's metadata without loading the model (an ONNX
file is walked field by field at the top level, the graph is skipped, so a truncated file
is told apart from one that is not ONNX at all); :func:`open_onnx_session` opens an ONNX
export in ONNX Runtime. Neither imports torch: the ONNX runtime of ``tk infer`` uses them.
Every problem is one :class:`ExportFileError` line.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import TkError

SCHEMA_VERSION = 1
PREFIX = "tk."
ZIP_META_NAME = "tk.json"  # extra file of the .pt2 / TorchScript archives
FORMATS = ("onnx", "pt2", "torchscript")
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ONNX_EXTRA = "onnx"
ONNX_INSTALL = "pip install 'tk-microtoolkit[onnx]'"

_REQUIRED = ("format", "precision", "classes", "preprocess", "source", "tk_version")
_JSON_KEYS = ("classes", "preprocess", "calibration", "source", "parity", "thresholds")


class ExportFileError(TkError):
    """An exported file that cannot be used (missing, damaged, not tk's); one line."""


def missing_extra(what: str) -> TkError:
    """The one line for an ONNX feature used without the ``[onnx]`` extra installed."""
    return TkError(f"{what} needs the optional ONNX packages (onnx, onnxruntime, onnxscript): "
                   f"{ONNX_INSTALL}")


@dataclass
class ExportInfo:
    """What an exported file says about itself (its tk metadata, checked)."""

    path: Path
    format: str
    precision: str
    classes: list[str]
    preprocess: dict[str, Any]
    source: dict[str, Any]
    tk_version: str
    task: str = "single-label"
    parity: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    thresholds: list[float] | None = None  # multi-label: per class
    exported: str = ""
    props: dict[str, str] = field(default_factory=dict)  # the raw key/values

    @property
    def input_name(self) -> str:
        return str(self.preprocess.get("input_name", INPUT_NAME))

    @property
    def output_name(self) -> str:
        return str(self.preprocess.get("output_name", OUTPUT_NAME))

    @property
    def crop_size(self) -> tuple[int, int]:
        h, w = self.preprocess["crop"]
        return int(h), int(w)

    @property
    def temperature(self) -> float | None:
        t = self.calibration.get("temperature")
        return float(t) if t is not None else None

    @property
    def data_config(self) -> dict[str, Any]:
        """The stored model's data config (``DataConfig.from_dict`` reads it)."""
        p = self.preprocess
        return {"input_size": list(p["input_size"]), "mean": list(p["mean"]),
                "std": list(p["std"]), "interpolation": p["interpolation"],
                "crop_pct": p["crop_pct"]}


# -- writing -------------------------------------------------------------------------------
def build_metadata(*, format: str, precision: str, classes: list[str],
                   preprocess: Mapping[str, Any], source: Mapping[str, Any], tk_version: str,
                   exported: str, task: str = "single-label",
                   parity: Mapping[str, Any] | None = None,
                   calibration: Mapping[str, Any] | None = None,
                   thresholds: list[float] | None = None) -> dict[str, str]:
    """The key/values (strings) an export carries; :func:`parse_metadata` reads them back."""
    values: dict[str, Any] = {
        "format_version": str(SCHEMA_VERSION), "format": format, "precision": precision,
        "classes": list(classes), "task": task, "preprocess": dict(preprocess),
        "source": dict(source), "parity": dict(parity or {}), "tk_version": tk_version,
        "exported": exported,
    }
    if calibration:
        values["calibration"] = dict(calibration)
    if thresholds is not None:
        values["thresholds"] = [float(t) for t in thresholds]
    return {PREFIX + k: (json.dumps(v, sort_keys=True) if k in _JSON_KEYS else str(v))
            for k, v in values.items()}


# -- reading -------------------------------------------------------------------------------
def parse_metadata(props: Mapping[str, str], path: str | os.PathLike[str]) -> ExportInfo:
    """Check the tk key/values of the file at ``path``; one-line :class:`ExportFileError`
    naming the file when they are missing or damaged."""
    where = os.fspath(path)
    if PREFIX + "format_version" not in props:
        raise ExportFileError(
            f"{where}: the model has no tk metadata (class names, preprocessing): it was not "
            "written by `tk export`, or the file was cut short; export the model with "
            "`tk export MODEL`")
    version = props[PREFIX + "format_version"]
    if version != str(SCHEMA_VERSION):
        raise ExportFileError(f"{where}: tk metadata version {version!r} is not one this tk "
                              f"reads ({SCHEMA_VERSION}); upgrade tk or re-export the model")
    missing = [k for k in _REQUIRED if PREFIX + k not in props]
    if missing:
        raise ExportFileError(f"{where}: damaged tk metadata (missing {PREFIX}{missing[0]}); "
                              "re-export the model")
    values: dict[str, Any] = {}
    for key in _JSON_KEYS:
        text = props.get(PREFIX + key)
        if text is None:
            continue
        try:
            values[key] = json.loads(text)
        except ValueError:
            raise ExportFileError(f"{where}: damaged tk metadata ({PREFIX}{key} is not JSON); "
                                  "re-export the model") from None
    classes = values.get("classes")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) for c in classes)):
        raise ExportFileError(f"{where}: damaged tk metadata ({PREFIX}classes is not a list "
                              "of class names); re-export the model")
    pre = values.get("preprocess")
    try:
        assert isinstance(pre, dict)
        assert pre.get("dtype") == "uint8" and pre.get("layout") == "NCHW"
        h, w = (int(v) for v in pre["crop"])
        assert h > 0 and w > 0
        for key in ("mean", "std", "input_size"):
            assert isinstance(pre[key], list) and len(pre[key]) == 3
        assert isinstance(pre["interpolation"], str)
        resize = pre["resize"]
        assert isinstance(resize, int) or (isinstance(resize, list) and len(resize) == 2)
    except (AssertionError, KeyError, TypeError, ValueError):
        raise ExportFileError(f"{where}: damaged tk metadata ({PREFIX}preprocess is not a "
                              "uint8 NCHW input description); re-export the model") from None
    fmt = props[PREFIX + "format"]
    if fmt not in FORMATS:
        raise ExportFileError(f"{where}: unknown export format {fmt!r} in its tk metadata")
    for key in ("source", "parity", "calibration"):
        if key in values and not isinstance(values[key], dict):
            raise ExportFileError(f"{where}: damaged tk metadata ({PREFIX}{key} is not a JSON "
                                  "object); re-export the model")
    return ExportInfo(
        path=Path(path), format=fmt, precision=props[PREFIX + "precision"],
        classes=list(classes), preprocess=pre, source=values["source"],
        tk_version=props[PREFIX + "tk_version"], task=props.get(PREFIX + "task", "single-label"),
        parity=values.get("parity", {}), calibration=values.get("calibration", {}),
        thresholds=_thresholds(values.get("thresholds"), len(classes), where),
        exported=props.get(PREFIX + "exported", ""),
        props={k: v for k, v in props.items() if k.startswith(PREFIX)})


def _thresholds(value: Any, n: int, where: str) -> list[float] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == n and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1
            for t in value)):
        raise ExportFileError(f"{where}: damaged tk metadata ({PREFIX}thresholds is not one "
                              "number in 0..1 per class); re-export the model")
    return [float(t) for t in value]


def read_export(path: str | os.PathLike[str]) -> ExportInfo:
    """The checked tk metadata of an exported file (``.onnx``, ``.pt2`` or TorchScript),
    read without loading the model: the format is found from the content, not the name."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise ExportFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ExportFileError(f"{p}: is a directory, not an exported model file") from None
    except OSError as exc:
        raise ExportFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if head.startswith(b"PK"):
        return parse_metadata(_zip_props(p), p)
    return parse_metadata(read_onnx_props(p), p)


def open_onnx_session(path: str | os.PathLike[str], *, providers: list[Any] | None = None,
                      threads: int | None = None, spinning: bool = True
                      ) -> tuple[Any, ExportInfo]:
    """``(onnxruntime.InferenceSession, ExportInfo)`` for an ONNX export: its metadata is
    checked first (cheap, clear errors), then ONNX Runtime loads the graph (a damaged graph
    is one line too). ``providers``: ONNX Runtime execution providers [CPU];
    ``threads``: intra-op threads [ONNX Runtime's choice]; ``spinning=False``: the
    intra-op threads sleep between runs instead of busy-waiting (leaves the cores to other
    processes, such as decoding workers)."""
    info = read_export(path)
    if info.format != "onnx":
        raise ExportFileError(f"{path}: a {info.format} export, not ONNX; export the model with "
                              "`tk export MODEL --format onnx`")
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing_extra("running an ONNX model") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options,
                                       providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        first = " ".join(str(exc).split())[:300]
        raise ExportFileError(f"{path}: damaged ONNX model, onnxruntime cannot load it "
                              f"({first}); re-export the model") from None
    inputs = session.get_inputs()
    if (len(inputs) != 1 or inputs[0].name != info.input_name
            or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4):
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ExportFileError(f"{path}: the graph's input ({got}) is not the uint8 "
                              f"[N,3,H,W] '{info.input_name}' its tk metadata describes")
    return session, info


# -- the file formats, read without their libraries -----------------------------------------
# ModelProto field numbers (onnx.proto) and their wire types (0 varint, 2 length-delimited)
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_GRAPH, _METADATA_PROPS = 7, 14


def read_onnx_props(path: str | os.PathLike[str]) -> dict[str, str]:
    """``metadata_props`` of an ONNX file, from a walk over the top-level protobuf fields
    (the graph is skipped, not parsed). ``ExportFileError`` for a file that is not an ONNX
    model, and for one that ends inside a field (truncated)."""
    where = os.fspath(path)
    not_onnx = f"{where}: not an ONNX model"
    props: dict[str, str] = {}
    seen_graph = False
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ExportFileError(f"{not_onnx} (the file is empty)")
            first = True
            while fh.tell() < size:
                key = _varint(fh, where, size)
                number, wire = key >> 3, key & 7
                known = _ONNX_FIELDS.get(number)
                if number == 0 or wire not in (0, 1, 2, 5) or (first and known is None) or (
                        known is not None and known != wire):
                    raise ExportFileError(_describe_foreign(fh, not_onnx))
                first = False
                if wire == 0:
                    _varint(fh, where, size)
                elif wire in (1, 5):
                    _skip(fh, 8 if wire == 1 else 4, where, size)
                else:
                    length = _varint(fh, where, size)
                    if number == _METADATA_PROPS:
                        k, v = _string_pair(_read(fh, length, where, size), not_onnx)
                        props[k] = v
                    else:
                        seen_graph |= number == _GRAPH
                        _skip(fh, length, where, size)
    except OSError as exc:
        raise ExportFileError(f"{where}: cannot read ({exc.strerror or exc})") from None
    if not seen_graph:
        raise ExportFileError(f"{not_onnx} (no graph)")
    return props


def _truncated(where: str) -> ExportFileError:
    return ExportFileError(f"{where}: truncated ONNX file (it ends in the middle of the model); "
                           "copy or export it again")


def _varint(fh: Any, where: str, size: int) -> int:
    value = shift = 0
    for _ in range(10):
        b = fh.read(1)
        if not b:
            raise _truncated(where)
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
    raise ExportFileError(f"{where}: not an ONNX model")


def _skip(fh: Any, n: int, where: str, size: int) -> None:
    if fh.tell() + n > size:
        raise _truncated(where)
    fh.seek(n, os.SEEK_CUR)


def _read(fh: Any, n: int, where: str, size: int) -> bytes:
    if fh.tell() + n > size:
        raise _truncated(where)
    return fh.read(n)


def _string_pair(buf: bytes, not_onnx: str) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (key = 1, value = 2)."""
    out = {1: b"", 2: b""}
    i = 0
    try:
        while i < len(buf):
            key = buf[i]
            i += 1
            length = shift = 0
            while True:
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            if key >> 3 in out and key & 7 == 2 and i + length <= len(buf):
                out[key >> 3] = buf[i:i + length]
            i += length
        return out[1].decode("utf-8"), out[2].decode("utf-8")
    except (IndexError, UnicodeDecodeError):
        raise ExportFileError(f"{not_onnx} (damaged metadata entry)") from None


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"))


def _describe_foreign(fh: Any, not_onnx: str) -> str:
    fh.seek(0)
    head = fh.read(16)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"{not_onnx} ({what})"
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte little-endian header size, then JSON
        return (f"{not_onnx} (a safetensors file: a stored tk model is exported with "
                "`tk export MODEL`)")
    return not_onnx


def _zip_props(path: Path) -> dict[str, str]:
    """The tk key/values of a ``.pt2`` / TorchScript archive (``<archive>/extra/tk.json``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist()
                     if n.endswith(f"/extra/{ZIP_META_NAME}") and n.count("/") == 2]
            is_torch = any(n.endswith(("/data.pkl", "/archive_format", "/version"))
                           for n in zf.namelist())
            if not names:
                what = "a PyTorch archive" if is_torch else "a zip archive, not a model"
                raise ExportFileError(
                    f"{path}: {what} without tk metadata (class names, preprocessing): it was "
                    "not written by `tk export`; export the model with `tk export MODEL`")
            raw = zf.read(names[0])
    except zipfile.BadZipFile:
        raise ExportFileError(f"{path}: damaged or truncated archive (not a readable .pt2 / "
                              "TorchScript file); copy or export it again") from None
    except (OSError, EOFError) as exc:
        raise ExportFileError(f"{path}: damaged or truncated archive ({exc}); copy or export "
                              "it again") from None
    try:
        props = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ExportFileError(f"{path}: damaged tk metadata ({ZIP_META_NAME} is not JSON); "
                              "re-export the model") from None
    if not isinstance(props, dict) or not all(isinstance(v, str) for v in props.values()):
        raise ExportFileError(f"{path}: damaged tk metadata ({ZIP_META_NAME} is not an object "
                              "of strings); re-export the model")
    return props
