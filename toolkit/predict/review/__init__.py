"""`tk review`: how a stored model does on a labelled set of images, as one self-contained
HTML page, and the csv of likely label errors beside it.

Steps, each in its own module:

- :mod:`~toolkit.predict.review.collect`: the labelled images (a class-folder tree or a
  ``path,label`` csv) through tk infer's listing, decoding, error rows and runner, keeping
  each row's logits and backbone features; the training images recorded in the model's
  metadata (``training.data``, when still on disk) for the leakage check;
- :mod:`~toolkit.predict.review.analysis`: every number (metrics, confusions, losses, label
  errors, near-duplicates, calibration);
- :mod:`~toolkit.predict.review.html`: the page.

```python
from toolkit.predict.review import ReviewArgs, run_review
result = run_review(ReviewArgs(model="demo", data="photos/", output="report.html"), plugins)
```
"""

from __future__ import annotations

import base64
import csv
import datetime
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.data.listing import PathList, warn_stderr
from toolkit.errors import TkError

if TYPE_CHECKING:
    from toolkit.predict.review.analysis import Review

THUMB_PX = 128
MAX_TRAIN_IMAGES = 20_000  # training images compared at most (the rest is said, not checked)


@dataclass
class ReviewArgs:
    """`tk review` options (see ``tk review --help``)."""

    model: str
    data: str
    output: str | None = None  # default: <model>-review.html in the current folder
    top_losses: int = 24
    store: str | None = None
    batch_size: int = 32
    device: str = "auto"
    workers: int | None = None
    train_duplicates: bool = True
    quiet: bool = False


@dataclass
class ReviewResult:
    report: str  # the HTML file
    labels_csv: str  # the label-issue csv
    review: Review


def labels_csv_path(report: str) -> str:
    stem, _ = os.path.splitext(report)
    return f"{stem}-labels.csv"


def training_images(meta: dict[str, Any], *, warn: Any = warn_stderr
                    ) -> tuple[PathList, str]:
    """The training images recorded in ``meta`` (``training.data``: a folder or a csv
    manifest) that are still on disk, and a sentence saying what was found."""
    from toolkit.data.listing import list_images
    from toolkit.predict.review.collect import read_manifest

    training = meta.get("training") or {}
    data = training.get("data_resolved") or training.get("data")
    if not data:
        name = training.get("dataset") or "a dataset plugin"
        return PathList(), (f"The model was trained on {name}, which has no image files on "
                            "disk: not checked.")
    p = Path(data)
    try:
        if p.is_dir():
            paths = PathList(list_images(p, warn=lambda _m: None))
        elif p.is_file() and p.suffix.lower() == ".csv":
            paths, _ = read_manifest(p, sorted({*meta.get("classes", [])}))
        else:
            return PathList(), f"The training data {data} is no longer there: not checked."
    except TkError as exc:
        return PathList(), f"The training data {data} cannot be read ({exc}): not checked."
    note = f"Compared with the {len(paths)} image(s) under {data} (training and validation)."
    if len(paths) > MAX_TRAIN_IMAGES:
        note += f" Only the first {MAX_TRAIN_IMAGES} were checked."
        paths = PathList(paths[:MAX_TRAIN_IMAGES])
    return paths, note


def thumbnail_uri(path: str, size: int = THUMB_PX) -> str:
    """A small JPEG of ``path`` as a ``data:`` URI, decoded like every tk image
    (:func:`toolkit.data.decode.load_image`); "" when it cannot be read."""
    from toolkit.data.decode import load_image

    try:
        img = load_image(path)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a thumbnail is never worth failing the report
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_labels_csv(review: Review, path: str) -> None:
    """Every reviewed image as ``path,label`` (the given label, to be fixed by the user)
    plus the model's view; flagged images first, most likely error first."""
    from model_store.atomic import atomic_write

    flagged = {x["index"]: rank for rank, x in enumerate(review.label_issues, start=1)}
    order = [x["index"] for x in review.label_issues] + [
        i for i in range(review.images) if i not in flagged]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "predicted", "score", "issue_rank"])
    for i in order:
        w.writerow([os.path.abspath(review.paths[i]), review.classes[review.labels[i]],
                    review.classes[review.predicted[i]], f"{review.scores[i]:.6f}",
                    flagged.get(i, "")])
    atomic_write(Path(path), [buf.getvalue().encode("utf-8")], "review csv")


def run_review(args: ReviewArgs, plugins: Any, log: Any = None) -> ReviewResult:
    """`tk review`: check the arguments and the output, load the model, measure, write
    the page and the csv."""
    from model_store import ModelStore
    from model_store.atomic import atomic_write
    from toolkit.data.decode import check_limits
    from toolkit.model.loading import load_model
    from toolkit.predict.infer import check_output_is_not_an_input, check_output_target
    from toolkit.predict.review.analysis import _sklearn, analyse
    from toolkit.predict.review.collect import collect, features_of, labelled_inputs
    from toolkit.progress import Progress

    def say(message: str) -> None:
        if log is not None:
            log(message)

    if args.top_losses < 0:
        raise TkError(f"--top-losses must be 0 or more, got {args.top_losses}")
    _sklearn()  # the extra is there, before any work
    check_limits()
    output = args.output or f"{args.model}-review.html"
    check_output_target(output)
    csv_out = labels_csv_path(output)
    store = ModelStore(args.store)
    store.info(args.model)  # a missing model fails here, cheaply
    if store.show(args.model).get("task") == "multi-label":
        raise TkError(f"tk review reads single-label models; '{args.model}' is multi-label: "
                      f"`tk eval --model {args.model} --data PATH` gives its mAP, F1 and "
                      "per-class figures")
    loaded_classes = list(store.info(args.model).classes)
    paths, labels = labelled_inputs(args.data, loaded_classes)
    for target in (output, csv_out):
        check_output_is_not_an_input(target, paths, store,
                                     os.fspath(store.model_path(args.model)))
    loaded = load_model(args.model, store, plugins=plugins, device="cpu")
    bar = Progress(len(paths), "review", enabled=not args.quiet)
    try:
        got = collect(loaded, paths, labels, batch_size=args.batch_size, device=args.device,
                      workers=args.workers, progress=bar)
    finally:
        bar.close()
    train: tuple[list[str], Any] | None = None
    note = "Not checked (--no-train-duplicates)."
    if args.train_duplicates:
        train_paths, note = training_images(loaded.meta)
        if len(train_paths):
            say(f"comparing with {len(train_paths)} training image(s) for near-duplicates")
            train = features_of(loaded, train_paths, batch_size=args.batch_size,
                                device=args.device, workers=args.workers)
    review = analyse(got, model=args.model, data=str(args.data), classes=loaded.classes,
                     meta=loaded.meta, top_losses=args.top_losses, train=train,
                     train_note=note)
    cache: dict[str, str] = {}

    def thumb(path: str) -> str:
        if path not in cache:
            cache[path] = thumbnail_uri(path)
        return cache[path]

    from toolkit.predict.review.html import render
    from toolkit.version import __version__

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = render(review, thumb, csv_name=os.path.basename(csv_out),
                  generated=f"tk {__version__}, {stamp}")
    atomic_write(Path(output), [page.encode("utf-8")], "review report")
    write_labels_csv(review, csv_out)
    return ReviewResult(output, csv_out, review)
