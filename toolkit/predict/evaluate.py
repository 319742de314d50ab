"""`tk eval`: accuracy, per-class precision / recall / F1 and the confusion matrix of a
stored model on a labelled image folder; for a multi-label model, mAP, micro / macro F1 and
per-class AP / precision / recall / F1 at the model's thresholds on a labelled manifest
(``--data FILE.csv`` with a ``labels`` column, read by the dataset plugin that claims it).

The folder holds one sub-folder per class, named like the model's classes (a sub-folder
the model does not know is an error naming it; a model class without a folder just has no
samples). Images are listed like `tk infer` lists them (:mod:`toolkit.data.listing`) and go
through the same runner (:class:`toolkit.predict.runner.Predictor`), so the numbers are those of the
predictions `tk infer` would write. Files that cannot be read are counted, reported, and
left out of the metrics.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.data.listing import PathList, Walker, Warn, class_folders, warn_stderr
from toolkit.errors import DataError, TkError

if TYPE_CHECKING:
    from collections.abc import Callable

    from toolkit.model.loading import LoadedModel


@dataclass
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: int  # true samples of the class


@dataclass
class EvalReport:
    model: str
    data: str
    classes: list[str]
    total: int  # images evaluated (readable)
    correct: int
    accuracy: float
    per_class: list[ClassMetrics]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    confusion: list[list[int]]  # [true][predicted]
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "error"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def labelled_files(data: str | os.PathLike[str], classes: list[str], *,
                   warn: Warn = warn_stderr) -> tuple[PathList, list[int]]:
    """The images of a class-per-sub-folder tree and their label indices in ``classes``
    (listed by tk's one folder walker, :class:`toolkit.data.listing.Walker`)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"--data {root}: no such folder")
    if not root.is_dir():
        raise DataError(f"--data {root}: not a folder (expected {root}/<class>/<images>)")
    try:
        folders = class_folders(root)
    except DataError as exc:
        raise DataError(f"cannot read --data {root}: {exc}") from None
    if not folders:
        raise DataError(f"--data {root}: no class sub-folders (expected {root}/<class>/<images>)")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataError(
            f"--data {root}: class folder(s) {', '.join(unknown)} are not classes of the "
            f"model (its classes: {', '.join(classes)})")
    paths = PathList()
    labels: list[int] = []
    walker = Walker(warn=warn)
    for name in folders:
        for p in walker.images(root / name):
            paths.append(p)
            labels.append(index[name])
    walker.report()
    if not len(paths):
        raise DataError(f"--data {root}: no image files in its class folders")
    return paths, labels


def metrics(confusion: list[list[int]], classes: list[str]
            ) -> tuple[list[ClassMetrics], float, float, float]:
    """Per-class precision / recall / F1 from a ``[true][predicted]`` matrix, and their
    macro averages over the classes that have samples or predictions (0 when undefined)."""
    n = len(classes)
    per: list[ClassMetrics] = []
    for c in range(n):
        tp = confusion[c][c]
        support = sum(confusion[c])
        predicted = sum(confusion[r][c] for r in range(n))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per.append(ClassMetrics(classes[c], precision, recall, f1, support))
    used = [m for c, m in enumerate(per)
            if m.support or any(confusion[r][c] for r in range(n))]
    k = len(used) or 1
    return (per, sum(m.precision for m in used) / k, sum(m.recall for m in used) / k,
            sum(m.f1 for m in used) / k)


@dataclass
class LabelMetrics:
    name: str
    ap: float | None  # None: no positive image of the class
    precision: float
    recall: float
    f1: float
    support: int  # images with the label
    threshold: float


@dataclass
class MultiLabelReport:
    model: str
    data: str
    classes: list[str]
    total: int
    map: float  # macro average precision over the classes with positives
    f1_micro: float
    f1_macro: float
    exact_match: float  # images whose every label decision is right
    per_class: list[LabelMetrics]
    task: str = "multi-label"
    failed: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_files(data: str | os.PathLike[str], classes: list[str], plugins: Any
                   ) -> tuple[PathList, list[tuple[int, ...]]]:
    """The images of a multi-label manifest and their label indices in ``classes``, read by
    the dataset plugin that claims the file (built-in: ``csv``), every part of it."""
    path = Path(data).expanduser()
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    name = plugins.dataset_for_path(str(path))
    if name is None:
        raise DataError(f"--data {path}: no loaded plugin reads this file")
    source = plugins.registry("datasets").resolve(name).factory(path=str(path))
    if getattr(source, "task", None) != "multi-label":
        raise DataError(f"--data {path}: the model is multi-label but this manifest has one "
                        "label per image (give a manifest with a 'labels' column)")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in source.classes if c not in index]
    if unknown:
        raise DataError(f"--data {path}: label(s) {', '.join(unknown[:12])} are not classes "
                        f"of the model (its classes: {', '.join(classes)})")
    paths, labels = PathList(), []
    for file, targets in [*source.samples, *(getattr(source, "val_samples", None) or [])]:
        paths.append(str(file))
        labels.append(tuple(index[source.classes[t]] for t in targets))
    return paths, labels


def _each_row(predictor: Any, paths: list[Path], take: Callable[[Any], None], *,
              progress: bool, warn: Warn) -> list[dict[str, str]]:
    """Predict ``paths``, hand every readable row to ``take``; the unreadable ones are
    warned about (one line each, above the progress bar) and returned."""
    from toolkit.predict.writers import escape_control, escape_path
    from toolkit.progress import Progress

    failed: list[dict[str, str]] = []
    bar = Progress(len(paths), "eval", enabled=progress)

    def say(message: str) -> None:  # warnings that do not tear the progress bar
        if warn is warn_stderr:
            bar.write(f"tk: warning: {message}")
        else:
            warn(message)

    predictor.warn = say
    rows = predictor.predict_paths(paths)
    try:
        for row in rows:
            bar.update(1)
            if row.error is not None:
                failed.append({"path": str(row.path), "error": row.error})
                say(f"{escape_control(escape_path(str(row.path)))}: {row.error} (left out)")
                continue
            take(row)
    finally:
        bar.close()
        rows.close()
    return failed


def evaluate_multilabel(loaded: LoadedModel, data: str | os.PathLike[str], plugins: Any, *,
                        batch_size: int = 32, device: Any = "auto", precision: str = "32",
                        channels_last: bool | None = None, workers: int | None = None,
                        decode: str = "auto", warn: Warn = warn_stderr,
                        progress: bool = False, tta: bool = False) -> MultiLabelReport:
    """Evaluate multi-label ``loaded`` on the manifest ``data`` (scores from the same runner
    as `tk infer`, metrics from :mod:`toolkit.metrics`)."""
    import numpy as np

    from toolkit.metrics import scores
    from toolkit.predict.runner import Predictor

    classes = list(loaded.classes)
    paths, labels = manifest_files(data, classes, plugins)
    c = len(classes)
    predictor = Predictor(loaded, batch_size=batch_size, topk=c, device=device,
                          precision=precision, channels_last=channels_last, workers=workers,
                          decode=decode, warn=warn, tta=tta)
    assert predictor.thresholds is not None
    index = {name: i for i, name in enumerate(classes)}
    probs, truth = [], []

    def take(row: Any) -> None:
        p = np.zeros(c, dtype=np.float64)
        for lab, score in row.topk:
            p[index[lab]] = score
        t = np.zeros(c, dtype=np.int64)
        t[list(labels[row.index])] = 1
        probs.append(p)
        truth.append(t)

    failed = _each_row(predictor, paths, take, progress=progress, warn=warn)
    if not probs:
        raise DataError(f"--data {data}: no image could be read")
    s = scores(np.stack(probs), np.stack(truth), predictor.thresholds)
    per = [LabelMetrics(classes[k], s.ap[k], s.precision[k], s.recall[k], s.f1[k],
                        s.support[k], predictor.thresholds[k]) for k in range(c)]
    return MultiLabelReport(model=loaded.name, data=str(data), classes=classes,
                            total=len(probs), map=s.map, f1_micro=s.f1_micro,
                            f1_macro=s.f1_macro, exact_match=s.exact_match, per_class=per,
                            failed=failed)


def format_multilabel(report: MultiLabelReport) -> str:
    lines = [f"model: {report.model} (multi-label)   data: {report.data}",
             f"images: {report.total}" + (f" ({len(report.failed)} unreadable, left out)"
                                          if report.failed else ""),
             f"mAP: {report.map:.4f}   F1 micro: {report.f1_micro:.4f}   F1 macro: "
             f"{report.f1_macro:.4f}   exact match: {report.exact_match:.4f}", ""]
    w = max([9, *(len(c) for c in report.classes)])
    lines.append(f"{'class':<{w}}  {'AP':>6}  {'precision':>9}  {'recall':>6}  {'f1':>6}  "
                 f"{'support':>7}  {'threshold':>9}")
    for m in report.per_class:
        ap = f"{m.ap:6.4f}" if m.ap is not None else f"{'-':>6}"
        lines.append(f"{m.name:<{w}}  {ap}  {m.precision:9.4f}  {m.recall:6.4f}  {m.f1:6.4f}  "
                     f"{m.support:7d}  {m.threshold:9.4f}")
    return "\n".join(lines)


def evaluate(loaded: LoadedModel, data: str | os.PathLike[str], *, batch_size: int = 32,
             device: Any = "auto", precision: str = "32", channels_last: bool | None = None,
             workers: int | None = None, decode: str = "auto", warn: Warn = warn_stderr,
             progress: bool = False, tta: bool = False) -> EvalReport:
    """Evaluate ``loaded`` on the labelled folder ``data``."""
    from toolkit.predict.runner import Predictor

    classes = list(loaded.classes)
    paths, labels = labelled_files(data, classes, warn=warn)
    predictor = Predictor(loaded, batch_size=batch_size, topk=1, device=device,
                          precision=precision, channels_last=channels_last, workers=workers,
                          decode=decode, warn=warn, tta=tta)
    index = {c: i for i, c in enumerate(classes)}
    n = len(classes)
    confusion = [[0] * n for _ in range(n)]

    def take(row: Any) -> None:
        confusion[labels[row.index]][index[str(row.label)]] += 1

    failed = _each_row(predictor, paths, take, progress=progress, warn=warn)
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(n))
    per, mp, mr, mf = metrics(confusion, classes)
    return EvalReport(model=loaded.name, data=str(data), classes=classes, total=total,
                      correct=correct, accuracy=correct / total if total else 0.0,
                      per_class=per, macro_precision=mp, macro_recall=mr, macro_f1=mf,
                      confusion=confusion, failed=failed)


@dataclass
class EvalArgs:
    """`tk eval` options (see ``tk eval --help``)."""

    data: str
    model: str | None = None
    store: str | None = None
    png: str | None = None
    batch_size: int = 32
    device: str = "auto"
    precision: str = "32"
    channels_last: bool | None = None
    workers: int | None = None
    decode: str = "auto"
    quiet: bool = False
    tta: bool = False


def run_eval(args: EvalArgs, plugins: Any, log: Any = None) -> EvalReport | MultiLabelReport:
    """`tk eval`: pick the model (the newest by default, said through ``log``), evaluate it
    on ``args.data``, draw the confusion matrix into ``args.png`` when asked."""
    from model_store import ModelStore
    from toolkit.data.decode import check_limits
    from toolkit.model.loading import load_model
    from toolkit.predict.infer import choose_model

    def say(message: str) -> None:
        if log is not None:
            log(message)

    check_limits()
    store = ModelStore(args.store)
    name = choose_model(store, args.model, say)
    loaded = load_model(name, store, plugins=plugins, device="cpu")
    if loaded.meta.get("task") == "multi-label":
        if args.png is not None:
            raise TkError("--png draws a confusion matrix: not for a multi-label model")
        return evaluate_multilabel(loaded, args.data, plugins, batch_size=args.batch_size,
                                   device=args.device, precision=args.precision,
                                   channels_last=args.channels_last, workers=args.workers,
                                   decode=args.decode, progress=not args.quiet,
                                   tta=args.tta)
    report = evaluate(loaded, args.data, batch_size=args.batch_size, device=args.device,
                      precision=args.precision, channels_last=args.channels_last,
                      workers=args.workers, decode=args.decode, progress=not args.quiet,
                      tta=args.tta)
    if args.png is not None:
        from toolkit.plots import confusion_matrix

        confusion_matrix(report.confusion, report.classes, Path(args.png),
                         title=f"{name}: accuracy {report.accuracy:.3f} "
                               "(rows: true, columns: predicted)")
        say(f"confusion matrix written to {args.png}")
    return report


def format_report(report: EvalReport | MultiLabelReport) -> str:
    """The text `tk eval` prints: accuracy, the per-class table, the confusion matrix (for
    a multi-label model: mAP, F1 and the per-class table)."""
    if isinstance(report, MultiLabelReport):
        return format_multilabel(report)
    lines = [f"model: {report.model}   data: {report.data}",
             f"images: {report.total}" + (f" ({len(report.failed)} unreadable, left out)"
                                          if report.failed else ""),
             f"accuracy: {report.accuracy:.4f} ({report.correct}/{report.total})", ""]
    w = max([9, *(len(c) for c in report.classes)])
    lines.append(f"{'class':<{w}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}")
    for m in report.per_class:
        lines.append(f"{m.name:<{w}}  {m.precision:9.4f}  {m.recall:6.4f}  {m.f1:6.4f}  "
                     f"{m.support:7d}")
    lines.append(f"{'macro avg':<{w}}  {report.macro_precision:9.4f}  "
                 f"{report.macro_recall:6.4f}  {report.macro_f1:6.4f}  {report.total:7d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
    cw = max([4, *(len(c) for c in report.classes),
              *(len(str(v)) for row in report.confusion for v in row)])
    lines.append(" " * w + "  " + "  ".join(f"{c:>{cw}}" for c in report.classes))
    for c, row in zip(report.classes, report.confusion, strict=True):
        lines.append(f"{c:<{w}}  " + "  ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)
