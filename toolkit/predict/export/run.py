"""`tk export` as a function: check the arguments, build the file, prove it matches the
eager model on real images, and only then write it (atomically, never into the store).

```python
from toolkit.predict.export.run import ExportArgs, export_model
result = export_model(ExportArgs("my-model", format="onnx", int8=True), plugins)
print(result.path, result.parity["max_abs_logit_diff"], result.int8["top1_agreement"])
```

The parity check: the exported file, loaded back from the bytes about to be written, runs on
up to :data:`PARITY_IMAGES` images (see :mod:`toolkit.predict.export.images` for where they
come from) in batches of up to 32; its logits are compared with the eager PyTorch model's
on the same images through tk's eval transform. The export is refused (``ExportError``,
exit 1, nothing written) when the top-1 class differs on any image, when any logit
differs by more than ``TOLERANCE x max(1, largest |eager logit|)``, or when the output is
not finite. With ``int8``, the quantized graph's top-1 must agree with the fp32 graph's on
at least :data:`INT8_MIN_AGREEMENT` of the images unless ``force``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import TkError
from toolkit.predict.export import formats as F
from toolkit.predict.export import images as imgs
from toolkit.predict.export.artifact import (
    FORMATS,
    ExportFileError,
    build_metadata,
    missing_extra,
    read_export,
)
from toolkit.predict.export.formats import ExportError

SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt"}
PARITY_IMAGES = 256
CALIBRATION_IMAGES = 128
SYNTHETIC_IMAGES = 32
TOLERANCE = 1e-3
INT8_MIN_AGREEMENT = 0.98
BATCH = 32

Log = Callable[[str], None]


@dataclass
class ExportArgs:
    """`tk export` options (see ``tk export --help``)."""

    model: str
    format: str = "onnx"
    output: str | None = None  # None: ./MODEL.onnx (.int8.onnx, .pt2, .torchscript.pt)
    int8: bool = False
    calibrate: str | None = None
    force: bool = False
    store: str | None = None
    parity_images: int = PARITY_IMAGES
    calibration_images: int = CALIBRATION_IMAGES


@dataclass
class ExportResult:
    path: Path
    format: str
    precision: str
    size_bytes: int
    model: str
    parity: dict[str, Any]
    int8: dict[str, Any] | None = None
    replaced: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """The lines `tk export` prints on stderr."""
        p = self.parity
        kind = f"{self.format} {self.precision}"
        again = ", replacing the earlier export" if self.replaced else ""
        lines = [f"exported '{self.model}' to {self.path} ({kind}, "
                 f"{self.size_bytes / 1e6:.1f} MB{again})",
                 f"parity with the eager model on {p['images']} {p['source']}: top-1 agreement "
                 f"{p['top1_agree']}/{p['images']}, max |logit diff| "
                 f"{p['max_abs_logit_diff']:.2g} (tolerance {p['tolerance']:.2g})"
                 + _accuracy(p, "accuracy_eager", "eager accuracy")]
        if self.int8:
            q = self.int8
            lines.append(
                f"int8 (calibrated on {q['calibration_images']} {q['calibration_source']}): "
                f"top-1 agreement with fp32 {q['top1_agreement']:.1%} "
                f"({q['top1_agree']}/{q['images']}; required {INT8_MIN_AGREEMENT:.0%}"
                f"{', overridden by --force' if q.get('forced') else ''})"
                + _accuracy(q, "accuracy_fp32", "accuracy fp32")
                + _accuracy(q, "accuracy_int8", "int8"))
        return lines


def _accuracy(d: dict[str, Any], key: str, label: str) -> str:
    return f", {label} {d[key]:.1%}" if d.get(key) is not None else ""


def _stderr(message: str) -> None:
    print(f"tk: {message}", file=sys.stderr, flush=True)


def check_onnx_extra(what: str) -> None:
    """One line naming the ``[onnx]`` extra when one of its packages cannot be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise missing_extra(what) from None


def default_output(name: str, fmt: str, int8: bool) -> Path:
    return Path.cwd() / f"{name}{'.int8' if int8 else ''}{SUFFIXES[fmt]}"


def check_output(out: Path, store_root: Path, inputs: list[Path], log: Log) -> bool:
    """Refuse an output path that is a folder, sits in an unwritable folder, lies inside the
    store or an input folder, or exists without being a tk export; True when it replaces
    an earlier export."""
    if out.is_dir():
        raise TkError(f"-o {out}: is a directory")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise TkError(f"-o {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise TkError(f"-o {out}: {parent} is not writable")
    real = out.resolve()
    if real.is_relative_to(store_root.resolve()):
        raise TkError(f"-o {out}: inside the model store {store_root}; tk export never writes "
                      "into the store: choose another path")
    for folder in inputs:
        if real.is_relative_to(folder.resolve()):
            raise TkError(f"-o {out}: inside {folder}, an input of this export: choose "
                          "another path")
    if not (out.exists() or out.is_symlink()):
        return False
    try:
        read_export(out)
    except ExportFileError:
        raise TkError(f"-o {out}: exists and is not a tk export; tk export does not overwrite "
                      "it (remove it or choose another path)") from None
    log(f"replacing the earlier export {out}")
    return True


def export_model(args: ExportArgs, plugins: Any, *, log: Log = _stderr,
                 warn: Log | None = None) -> ExportResult:
    """`tk export`: see the module doc. Usage errors are found before torch is imported."""
    from model_store import ModelStore

    warn = warn or (lambda m: log(f"warning: {m}"))
    if args.format not in FORMATS:
        raise TkError(f"--format {args.format}: expected one of {', '.join(FORMATS)}")
    if args.int8 and args.format != "onnx":
        raise TkError(f"--int8 quantizes ONNX models: use it with --format onnx, not "
                      f"{args.format}")
    if args.format == "onnx":
        check_onnx_extra("tk export --format onnx")
    calibrate = Path(args.calibrate).expanduser() if args.calibrate else None
    if calibrate is not None and not calibrate.is_dir():
        raise TkError(f"--calibrate {args.calibrate}: no such folder")
    store = ModelStore(args.store)
    info = store.info(args.model)  # a missing model fails here, cheaply
    out = Path(args.output).expanduser() if args.output else default_output(
        args.model, args.format, args.int8)
    replaced = check_output(out, store.root, [calibrate] if calibrate else [], log)
    calib_files: tuple[list[str], list[int] | None] | None = None
    if calibrate is not None:
        calib_files = imgs.folder_images(calibrate, info.classes)

    from model_store.fileformat import sha256_file
    from model_store.metadata import now_iso
    from toolkit.model.loading import load_model
    from toolkit.predict.scoring import model_temperature
    from toolkit.version import __version__

    loaded = load_model(args.model, store, plugins=plugins, device="cpu")
    parity_set, calib_set, notes = _image_sets(args, loaded, plugins, calibrate, calib_files,
                                               warn)
    for note in notes:
        log(f"note: {note}")
    _, h, w = loaded.data_config.input_size
    dc = loaded.data_config
    preprocess = _preprocess(loaded)
    meta = loaded.meta
    source = {"name": args.model, "sha256": sha256_file(loaded.path) if loaded.path else None,
              "backbone": loaded.spec.backbone, "head": loaded.spec.head,
              "created": meta.get("created")}
    temperature = model_temperature(meta)  # the one reading of a calibration record
    calibration = ({"method": "temperature", "temperature": temperature}
                   if temperature != 1.0 else None)
    precision = "int8" if args.int8 else "fp32"

    def props(parity: dict[str, Any]) -> dict[str, str]:
        return build_metadata(format=args.format, precision=precision,
                              classes=list(loaded.classes), preprocess=preprocess,
                              source=source, tk_version=__version__, exported=now_iso(),
                              task=str(meta.get("task", "single-label")), parity=parity,
                              calibration=calibration, thresholds=meta.get("thresholds"))

    log(f"exporting '{args.model}' ({loaded.spec.backbone}, {h}x{w}) to {args.format}; "
        f"checking it on {len(parity_set)} {parity_set.source}")
    module = F.uint8_module(loaded.model, dc.mean, dc.std)
    doc = f"tk export of model '{args.model}' ({loaded.spec.backbone})"
    if args.format == "onnx":
        proto = F.onnx_proto(module, h, w)
        fp32 = F.onnx_bytes(proto, props({}), doc)
        run = F.onnx_runner(fp32)
    elif args.format == "pt2":
        program = F.pt2_program(module, h, w)
        run = F.pt2_runner(F.pt2_bytes(program, props({})))
    else:
        traced = F.torchscript_module(module, h, w)
        run = F.torchscript_runner(F.torchscript_bytes(traced, props({})))

    outputs = _run_all(run, parity_set, args.format)
    parity = compare(outputs, parity_set, args.format)
    int8_report = None
    if args.int8:
        assert calib_set is not None
        qproto = F.quantize_int8(fp32, calib_set.batches(16))
        qrun = F.onnx_runner(F.onnx_bytes(qproto, props(parity), doc))
        qout = _run_all(qrun, parity_set, "int8 onnx")
        int8_report = int8_agreement(outputs, qout, parity_set, calib_set, args.force)
        parity["int8"] = int8_report
        data = F.onnx_bytes(qproto, props(parity), doc)
    elif args.format == "onnx":
        data = F.onnx_bytes(proto, props(parity), doc)
    elif args.format == "pt2":
        data = F.pt2_bytes(program, props(parity))
    else:
        data = F.torchscript_bytes(traced, props(parity))

    from model_store.atomic import atomic_write

    size = atomic_write(out.absolute(), [data], "the export")
    return ExportResult(path=out, format=args.format, precision=precision, size_bytes=size,
                        model=args.model, parity=parity, int8=int8_report, replaced=replaced,
                        notes=notes)


def _preprocess(loaded: Any) -> dict[str, Any]:
    """``tk.preprocess``: what a client does before the graph (from tk's eval transform)."""
    from toolkit.data.transforms import eval_transform

    dc = loaded.data_config
    transform = eval_transform(dc)
    resize = transform.resize_size
    return {
        "input_name": F.INPUT_NAME, "output_name": F.OUTPUT_NAME, "layout": "NCHW",
        "dtype": "uint8", "channels": "RGB", "input_size": [int(v) for v in dc.input_size],
        "resize": resize if isinstance(resize, int) else list(resize),
        "crop": list(transform.crop_size), "crop_pct": float(dc.crop_pct),
        "interpolation": dc.interpolation, "mean": list(dc.mean), "std": list(dc.std),
        "normalize": "in-graph",
    }


def _image_sets(args: ExportArgs, loaded: Any, plugins: Any, calibrate: Path | None,
                calib_files: tuple[list[str], list[int] | None] | None, warn: Log
                ) -> tuple[imgs.ImageSet, imgs.ImageSet | None, list[str]]:
    """``(parity images, int8 calibration images or None, notes)``: parity on held-out
    data when there is some, calibration on training data (see the module doc of
    :mod:`toolkit.predict.export.images`)."""
    notes: list[str] = []
    try:
        train, val, data_desc = imgs.training_splits(loaded, plugins)
    except (TkError, OSError, ValueError, TypeError) as exc:  # gone, moved, changed
        train = val = None
        data_desc = ""
        notes.append(f"the training data of '{args.model}' is not reachable ({exc})")
    parity_src: Any
    if val is not None:
        parity_src = (imgs.from_dataset(val, args.parity_images, warn),
                      f"validation images of {data_desc}")
        if calibrate is not None and not args.int8:
            notes.append(f"--calibrate {calibrate}: not used (the parity check uses the "
                         "model's validation images)")
    elif calib_files is not None:
        parity_src = (imgs.from_folder(*calib_files, args.parity_images, warn),
                      f"images of --calibrate {calibrate}")
    else:
        from toolkit.data.transforms import eval_transform

        size = eval_transform(loaded.data_config).draft_size
        parity_src = (imgs.synthetic(SYNTHETIC_IMAGES, size),
                      "synthetic images (smooth random colour fields; no real images "
                      "reachable: pass --calibrate DIR)")
    calib_src: Any = None
    if args.int8:
        if calib_files is not None:
            calib_src = (imgs.from_folder(*calib_files, args.calibration_images, warn),
                         f"images of --calibrate {calibrate}")
        elif train is not None:
            calib_src = (imgs.from_dataset(train, args.calibration_images, warn),
                         f"training images of {data_desc}")
        else:
            raise TkError(f"--int8 needs calibration images and {notes[0]}: pass "
                          "--calibrate DIR (a folder of images like the ones the model "
                          "will see)")
    parity_set = imgs.collect(*parity_src, loaded=loaded)
    calib_set = imgs.collect(*calib_src, loaded=loaded, eager=False) if calib_src else None
    return parity_set, calib_set, notes


def _run_all(run: F.Runner, images: Any, what: str) -> Any:
    import numpy as np

    outputs = []
    for batch in images.batches(BATCH):
        try:
            outputs.append(np.asarray(run(batch), dtype=np.float32))
        except Exception as exc:  # a runtime failure: the export is unusable
            raise ExportError(f"the exported {what} model fails on a batch of {len(batch)} "
                              f"images ({F.why(exc)}); nothing written") from exc
    return np.concatenate(outputs)


def compare(outputs: Any, images: Any, what: str) -> dict[str, Any]:
    """The parity figures of ``outputs`` against ``images.eager``; ``ExportError`` when
    they fail the check (see the module doc)."""
    import numpy as np

    eager = images.eager
    if outputs.shape != eager.shape:
        raise ExportError(f"the exported {what} model returns logits of shape "
                          f"{list(outputs.shape)}, the eager model {list(eager.shape)}; "
                          "nothing written")
    n = len(eager)
    scale = max(1.0, float(np.abs(eager).max()))
    tolerance = TOLERANCE * scale
    finite = bool(np.isfinite(outputs).all())
    diff = float(np.abs(outputs - eager).max()) if finite else float("inf")
    agree = int((outputs.argmax(1) == eager.argmax(1)).sum())
    parity: dict[str, Any] = {
        "images": n, "source": images.source,
        "reference": "the eager PyTorch model (fp32, CPU) through tk's eval transform",
        "max_abs_logit_diff": diff, "tolerance": tolerance,
        "tolerance_rule": f"{TOLERANCE:g} x max(1, largest |eager logit|)",
        "top1_agree": agree, "top1_agreement": agree / n,
    }
    if images.labels is not None:
        labels = np.asarray(images.labels)
        parity["accuracy_eager"] = float((eager.argmax(1) == labels).mean())
        parity["accuracy_export"] = float((outputs.argmax(1) == labels).mean())
    if not finite or agree < n or diff > tolerance:
        what_failed = ("non-finite logits" if not finite else
                       f"top-1 differs on {n - agree} of {n} images" if agree < n else
                       f"max |logit diff| {diff:.3g} > tolerance {tolerance:.3g}")
        raise ExportError(f"the {what} export does not match the eager model on {n} "
                          f"{images.source}: {what_failed}; nothing written")
    return parity


def int8_agreement(fp32: Any, int8: Any, images: Any, calib: Any, force: bool
                   ) -> dict[str, Any]:
    """Top-1 agreement of the int8 graph with the fp32 graph (and accuracies with labels);
    ``ExportError`` below :data:`INT8_MIN_AGREEMENT` unless ``force``."""
    import numpy as np

    n = len(fp32)
    agree = int((int8.argmax(1) == fp32.argmax(1)).sum())
    report: dict[str, Any] = {
        "images": n, "source": images.source, "calibration_images": len(calib),
        "calibration_source": calib.source, "method": "onnxruntime static QDQ, per-channel "
        "int8 weights, uint8 activations, MinMax calibration",
        "top1_agree": agree, "top1_agreement": agree / n,
        "max_abs_logit_diff_vs_fp32": float(np.abs(int8 - fp32).max()),
        "required_agreement": INT8_MIN_AGREEMENT, "forced": False,
    }
    if images.labels is not None:
        labels = np.asarray(images.labels)
        report["accuracy_fp32"] = float((fp32.argmax(1) == labels).mean())
        report["accuracy_int8"] = float((int8.argmax(1) == labels).mean())
    if agree / n < INT8_MIN_AGREEMENT:
        if not force:
            acc = _accuracy(report, "accuracy_fp32", "accuracy fp32") + _accuracy(
                report, "accuracy_int8", "int8")
            raise ExportError(f"int8 top-1 agrees with fp32 on {agree}/{n} {images.source} "
                              f"({agree / n:.1%} < {INT8_MIN_AGREEMENT:.0%}{acc}); nothing "
                              "written (--force writes it anyway)")
        report["forced"] = True
    return report
