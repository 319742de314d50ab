"""Built-in datasets: ``imagefolder``, ``csv`` (a manifest) and ``shapes`` (generated).

Every factory returns a :class:`toolkit.data.datasets.DatasetSource`; its keyword arguments are
its options (``path`` is ``--data``, ``num_classes`` is ``--classes``; ``None`` means "not
given"), so the core can check option names against the signature.

``imagefolder`` (``path``, optional ``val_path``)
    One sub-folder per class (sorted names = class indices), images found recursively
    inside it by extension (case-insensitive, see ``toolkit.data.decode.IMAGE_EXTENSIONS``),
    hidden files and folders skipped, sorted order. A folder holding ``train/`` and
    ``val/`` (or ``valid/``, ``validation/``; ``test/`` is ignored) uses them as the two
    parts; so does ``val_path``; otherwise a seeded stratified split. A ``path`` that is a
    ``.csv`` file is read as a ``csv`` manifest.
``csv`` (``path`` to the manifest; ``root``, ``allow_outside_root``, ``val_path``)
    A header with ``path`` and ``label`` columns (others ignored; an optional ``split``
    column with ``train`` / ``val`` fixes the split). A ``labels`` column instead of
    ``label`` makes it multi-label: classes separated by ``;``, empty for none (a seeded
    random split; ``task = "multi-label"``). ``val_path`` (``--val-data``): a second
    manifest of the same kind for validation; its labels must be training classes.
    Relative paths are relative to the manifest's folder (or ``root``); a path leaving
    that root (``..``, absolute, symlink) is refused unless ``allow_outside_root=true``.
    Classes: the sorted unique labels.
``shapes`` (``num_classes`` 2-10, default 5; ``samples`` 1200 in all; ``image_size`` 64)
    See :mod:`plugins.shapes`. Validation images are drawn from indices disjoint from the
    training ones.

Nothing heavy is imported at module level: torch and Pillow load when data is used.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from toolkit.errors import DataError
from toolkit.plugin.hookspecs import hookimpl

VAL_DIR_NAMES = ("val", "valid", "validation")


# -- option helpers --------------------------------------------------------------------


def _int(name: str, value: Any, *, minimum: int | None = None) -> int:
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        number = int(float(value))
    except (TypeError, ValueError):
        raise DataError(f"{name} must be a whole number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise DataError(f"{name} must be at least {minimum}, got {number}")
    return number


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise DataError(f"{name} must be true or false, got {value!r}")


def _check_class_count(num_classes: Any, classes: list[str], where: str) -> None:
    if num_classes is None:
        return
    n = _int("--classes", num_classes, minimum=1)
    if n != len(classes):
        shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
        raise DataError(f"--classes {n} but {where} has {len(classes)} "
                        f"class{'es' if len(classes) != 1 else ''} ({shown})")
    return


def _need_two(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{where} has {len(classes)} class{'es' if len(classes) != 1 else ''}"
                        f"{' (' + classes[0] + ')' if classes else ''}; a classifier needs "
                        f"at least 2")


# -- file-backed sources ---------------------------------------------------------------


class FileListSource:
    """A :class:`toolkit.data.datasets.DatasetSource` over ``(path, label)`` lists.

    ``samples``: the main samples (the ones split when there is no explicit validation
    part); ``val_samples``: the explicit validation samples, or ``None``.
    """

    def __init__(self, classes: list[str], samples: list[tuple[str, Any]],
                 val_samples: list[tuple[str, Any]] | None = None, *, description: str = "",
                 task: str = "single-label"):
        self.classes = classes
        self.samples = samples
        self.val_samples = val_samples
        self.description = description
        self.task = task  # "multi-label": each label is a tuple of class indices

    def split_samples(self, *, val_split: float, seed: int
                      ) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        if self.val_samples is not None:
            return list(self.samples), list(self.val_samples)
        if self.task == "multi-label":
            from toolkit.data.splits import random_split

            train_idx, val_idx = random_split(len(self.samples), val_split, seed)
            return [self.samples[i] for i in train_idx], [self.samples[i] for i in val_idx]
        from toolkit.data.splits import stratified_split

        train_idx, val_idx = stratified_split([label for _, label in self.samples], val_split,
                                              seed, class_names=self.classes)
        return [self.samples[i] for i in train_idx], [self.samples[i] for i in val_idx]

    def splits(self, train_transform: Any, eval_transform: Any, *, val_split: float,
               seed: int) -> tuple[Any, Any]:
        from toolkit.data.datasets import ImageListDataset, MultiLabelListDataset

        train, val = self.split_samples(val_split=val_split, seed=seed)
        if self.task == "multi-label":
            k = len(self.classes)
            return (MultiLabelListDataset(train, k, train_transform),
                    MultiLabelListDataset(val, k, eval_transform))
        return ImageListDataset(train, train_transform), ImageListDataset(val, eval_transform)

    def __repr__(self) -> str:
        return f"FileListSource({self.description}, {len(self.classes)} classes)"


def _class_dirs(root: Path) -> list[str]:
    from toolkit.data.listing import class_folders

    try:
        return class_folders(root)
    except DataError as exc:
        raise DataError(f"cannot read data {str(exc).removeprefix('cannot read ')}") from None


def _unreadable(folder: str, exc: OSError) -> None:
    raise DataError(f"cannot read folder {folder}: {exc.strerror or exc} (training data must "
                    "be readable)")


def _list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` through tk's one folder walker
    (:class:`toolkit.data.listing.Walker`): recursive, sorted, hidden entries skipped,
    symlinked folders followed once; an unreadable folder stops with one line."""
    from toolkit.data.listing import list_images

    return list_images(folder, unreadable=_unreadable)


def _folder_samples(root: Path, classes: list[str] | None = None
                    ) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of a class-per-sub-folder tree. With ``classes`` given (the
    training classes), ``root``'s sub-folders must be among them."""
    from toolkit.data.decode import IMAGE_EXTENSIONS

    found = _class_dirs(root)
    if not found:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<images>)")
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(f"validation folder {root} has classes that the training data "
                            f"lacks: {', '.join(extra)}")
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for name in found:
        files = _list_images(root / name)
        if not files:
            raise DataError(f"class '{name}' ({root / name}) has no image files "
                            f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
        samples.extend((f, index[name]) for f in files)
    return classes, samples


def _existing_dir(path: Any, what: str) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise DataError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise DataError(f"{what} {p} is not a folder")
    return p


def imagefolder(path: Any = None, val_path: Any = None, num_classes: Any = None
                ) -> FileListSource:
    """A folder of class sub-folders (see the module docstring)."""
    if path is None:
        raise DataError("dataset 'imagefolder' needs a folder: --data PATH")
    p = Path(os.fspath(path)).expanduser()
    if p.is_file() and p.suffix.lower() == ".csv":
        return manifest(path=p, num_classes=num_classes, val_path=val_path)
    root = _existing_dir(p, "data folder")
    val_root = None
    if val_path is not None:
        val_root = _existing_dir(val_path, "validation folder")
        train_root = root
    else:
        subdirs = _class_dirs(root)
        vals = [d for d in subdirs if d in VAL_DIR_NAMES]
        if "train" in subdirs and vals and set(subdirs) <= {"train", "test", *VAL_DIR_NAMES}:
            train_root, val_root = root / "train", root / vals[0]
        else:
            train_root = root
    classes, samples = _folder_samples(train_root)
    _check_class_count(num_classes, classes, str(p))
    _need_two(classes, str(p))
    val_samples = None
    if val_root is not None:
        _, val_samples = _folder_samples(val_root, classes)
    return FileListSource(classes, samples, val_samples, description=str(p))


def manifest(path: Any = None, num_classes: Any = None, root: Any = None,
             allow_outside_root: Any = False, val_path: Any = None) -> FileListSource:
    """A csv manifest of ``path,label`` rows, or ``path,labels`` rows (multi-label; see
    the module docstring). ``val_path``: a second manifest of the same kind for
    validation, whose labels must be classes of the first."""
    if path is None:
        raise DataError("dataset 'csv' needs a manifest file: --data FILE.csv")
    mpath = Path(os.fspath(path)).expanduser()
    multi, rows = _read_manifest(mpath, root, allow_outside_root)
    if multi:
        classes = sorted({lab for _, labels, _, _ in rows for lab in labels})
    else:
        classes = sorted({label for _, label, _, _ in rows})
    _check_class_count(num_classes, classes, f"manifest {mpath}")
    _need_two(classes, f"manifest {mpath}")
    index = {c: i for i, c in enumerate(classes)}

    def target(label: Any) -> Any:
        return tuple(index[x] for x in label) if multi else index[label]

    task = "multi-label" if multi else "single-label"
    if val_path is not None:
        vpath = Path(os.fspath(val_path)).expanduser()
        vmulti, vrows = _read_manifest(vpath, None, allow_outside_root)
        if vmulti != multi:
            raise DataError(f"--val-data {vpath} has a '{'labels' if vmulti else 'label'}' "
                            f"column but --data {mpath} a '{'labels' if multi else 'label'}' "
                            "one: use the same kind of manifest for both")
        for _, label, _, line in vrows:
            for lab in (label if multi else (label,)):
                if lab not in index:
                    raise DataError(f"--val-data {vpath} line {line}: label {lab!r} is not a "
                                    f"class of the training data ({', '.join(classes[:12])}"
                                    f"{', ...' if len(classes) > 12 else ''})")
        return FileListSource(classes, [(f, target(lab)) for f, lab, _, _ in rows],
                              [(f, target(lab)) for f, lab, _, _ in vrows],
                              description=str(mpath), task=task)
    parts = [part for _, _, part, _ in rows]
    if any(part is not None for part in parts):
        if any(part is None for part in parts):
            raise DataError(f"manifest {mpath}: some rows have a split and others not")
        train = [(f, target(lab)) for f, lab, part, _ in rows if part == "train"]
        val = [(f, target(lab)) for f, lab, part, _ in rows if part == "val"]
        if not train or not val:
            raise DataError(f"manifest {mpath}: the split column needs both train and val rows")
        return FileListSource(classes, train, val, description=str(mpath), task=task)
    return FileListSource(classes, [(f, target(lab)) for f, lab, _, _ in rows],
                          description=str(mpath), task=task)


def _read_manifest(mpath: Path, root: Any, allow_outside_root: Any
                   ) -> tuple[bool, list[tuple[str, Any, str | None, int]]]:
    """``(multi_label, rows)`` of a manifest: rows are ``(file, label, split, line)``, the
    label a string, or a sorted tuple of strings (possibly empty) when the header has
    ``labels``."""
    if not mpath.is_file():
        raise DataError(f"manifest {mpath} does not exist" if not mpath.exists()
                        else f"manifest {mpath} is not a file")
    base = Path(os.fspath(root)).expanduser() if root is not None else mpath.parent
    if not base.is_dir():
        raise DataError(f"manifest root {base} is not a folder")
    base_real = os.path.realpath(base)
    outside_ok = _bool("allow_outside_root", allow_outside_root)

    try:
        fh = open(mpath, newline="", encoding="utf-8-sig")  # noqa: SIM115
    except OSError as exc:
        raise DataError(f"cannot read manifest {mpath}: {exc.strerror or exc}") from None
    rows: list[tuple[str, Any, str | None, int]] = []
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"manifest {mpath} is empty (expected a 'path,label' header)")
            cols = [h.strip().lower() for h in header]
            if "label" in cols and "labels" in cols:
                raise DataError(f"manifest {mpath}: the header has both 'label' and 'labels' "
                                "columns; keep 'label' (one class per image) or 'labels' "
                                "(classes separated by ';', multi-label)")
            multi = "labels" in cols
            if "path" not in cols or not ("label" in cols or multi):
                raise DataError(f"manifest {mpath}: the header must have 'path' and 'label' "
                                f"columns, or 'path' and 'labels' for multi-label (found: "
                                f"{', '.join(cols) or 'nothing'})")
            ip, il = cols.index("path"), cols.index("labels" if multi else "label")
            isplit = cols.index("split") if "split" in cols else None
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) <= ip or (len(row) <= il and not multi):
                    raise DataError(f"manifest {mpath} line {line}: expected a path and a label")
                rel = row[ip].strip()
                cell = row[il].strip() if len(row) > il else ""
                if not rel or (not cell and not multi):
                    raise DataError(f"manifest {mpath} line {line}: empty "
                                    f"{'path' if not rel else 'label'}")
                label: Any = cell
                if multi:
                    label = tuple(sorted({x.strip() for x in cell.split(";") if x.strip()}))
                part: Any = None
                if isplit is not None and len(row) > isplit and row[isplit].strip():
                    part = row[isplit].strip().lower()
                    part = "val" if part in VAL_DIR_NAMES else part
                    if part not in ("train", "val"):
                        raise DataError(f"manifest {mpath} line {line}: split must be 'train' "
                                        f"or 'val', got {row[isplit].strip()!r}")
                file = _manifest_file(rel, base, base_real, outside_ok, f"manifest {mpath} "
                                      f"line {line}")
                rows.append((file, label, part, line))
        except csv.Error as exc:
            raise DataError(f"manifest {mpath} line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise DataError(f"manifest {mpath} is not UTF-8 text") from None
    if not rows:
        raise DataError(f"manifest {mpath} lists no images")
    return multi, rows


def _manifest_file(rel: str, base: Path, base_real: str, outside_ok: bool, where: str) -> str:
    candidate = Path(rel).expanduser() if rel.startswith("~") else Path(rel)
    full = candidate if candidate.is_absolute() else base / candidate
    real = os.path.realpath(full)
    if not outside_ok:
        try:
            inside = os.path.commonpath([base_real, real]) == base_real
        except ValueError:  # different drives
            inside = False
        if not inside:
            raise DataError(f"{where}: path '{rel}' is outside the root {base} (pass "
                            f"--opt dataset.allow_outside_root=true to allow it)")
    if not os.path.isfile(real):
        raise DataError(f"{where}: no such image file: {rel}" if not os.path.exists(real)
                        else f"{where}: not a file: {rel}")
    return os.fspath(full)


# -- generated source ------------------------------------------------------------------


class ShapesSource:
    """The embedded ``shapes`` dataset (a :class:`toolkit.data.datasets.DatasetSource`)."""

    def __init__(self, num_classes: int, image_size: int, samples: int, seed: int | None):
        from plugins.shapes import KINDS

        self.classes = list(KINDS[:num_classes])
        self.image_size = image_size
        self.num_samples = samples
        self.seed = seed

    def split_indices(self, *, val_split: float, seed: int) -> tuple[range, range]:
        """Training indices first, validation indices after them: disjoint images."""
        try:
            frac = float(val_split)
        except (TypeError, ValueError):
            frac = -1.0
        if not 0.0 < frac < 1.0:
            raise DataError(f"--val-split must be between 0 and 1 (exclusive), got {val_split}")
        k = len(self.classes)
        n_val = max(k, int(round(self.num_samples * frac)))
        n_train = self.num_samples - n_val
        if n_train < k:
            raise DataError(f"shapes: {self.num_samples} samples are too few for "
                            f"--val-split {val_split} with {k} classes")
        return range(n_train), range(n_train, self.num_samples)

    def generator(self, seed: int):
        from plugins.shapes import ShapesGenerator

        return ShapesGenerator(len(self.classes), self.image_size,
                               self.seed if self.seed is not None else int(seed))

    def splits(self, train_transform: Any, eval_transform: Any, *, val_split: float,
               seed: int) -> tuple[Any, Any]:
        from toolkit.data.datasets import IndexedDataset

        train_idx, val_idx = self.split_indices(val_split=val_split, seed=seed)
        make = self.generator(seed)
        return (IndexedDataset(make, train_idx, train_transform),
                IndexedDataset(make, val_idx, eval_transform))

    def __repr__(self) -> str:
        return (f"ShapesSource({', '.join(self.classes)}; {self.num_samples} samples of "
                f"{self.image_size}px, seed {self.seed})")


def shapes(num_classes: Any = None, image_size: Any = None, samples: Any = None,
           seed: Any = None, path: Any = None) -> ShapesSource:
    """Generated shape images (see :mod:`plugins.shapes`)."""
    from plugins.shapes import KINDS

    if path is not None:
        raise DataError("dataset 'shapes' is generated and takes no --data path")
    k = 5 if num_classes is None else _int("--classes", num_classes)
    if not 2 <= k <= len(KINDS):
        raise DataError(f"the shapes dataset has {len(KINDS)} kinds of shape "
                        f"({', '.join(KINDS)}); --classes must be between 2 and {len(KINDS)}, "
                        f"got {k}")
    size = 64 if image_size is None else _int("image_size", image_size, minimum=8)
    n = 1200 if samples is None else _int("samples", samples, minimum=2 * k)
    s = None if seed is None else _int("seed", seed)
    return ShapesSource(k, size, n, s)


@hookimpl
def tk_dataset_for_path(path: str) -> str | None:
    """Folders are image folders, ``.csv`` files are manifests."""
    p = Path(path)
    if p.is_dir():
        return "imagefolder"
    if p.suffix.lower() == ".csv":
        return "csv"
    return None


@hookimpl
def tk_register_datasets(register: Any) -> None:
    register("imagefolder", imagefolder,
             description="folder of class sub-folders (optional train/ and val/ parts); "
                         "options: path, val_path")
    register("csv", manifest,
             description="csv manifest with path,label (or path,labels: multi-label, "
                         "';'-separated) columns; options: path, root, allow_outside_root, "
                         "val_path")
    register("shapes", shapes, default=True,
             description="generated shapes (embedded default); options: num_classes, "
                         "samples, image_size, seed")
