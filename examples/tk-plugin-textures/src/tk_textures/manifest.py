"""``json-manifest``: images listed in a JSON file, claimed for ``tk finetune --data FILE.json``.

The format (``tk textures-preview OUT --manifest`` writes one)::

    {
      "classes": ["stripes-h", "stripes-v"],            optional: label order (default:
                                                        the labels in order of appearance)
      "images": [
        {"path": "stripes-h/a.png", "label": "stripes-h"},
        {"path": "stripes-v/b.png", "label": "stripes-v", "split": "val"},
        ...
      ]
    }

Paths are relative to the manifest's folder and may not leave it. With a ``split`` on every
image (``"train"`` or ``"val"``) the split is the manifest's; without any, tk's seeded
stratified split. Every mistake is one :class:`toolkit.errors.DataError` line naming the
manifest. Torch is imported only by ``splits`` (through ``toolkit.data``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.errors import DataError

MAX_BYTES = 64 * 1024 * 1024  # a manifest is a list of names, never gigabytes


def claims(path: str) -> bool:
    """What ``tk_dataset_for_path`` asks: is this a manifest? Cheap: the name only."""
    return path.lower().endswith(".json")


class JsonManifest:
    """What tk expects from a dataset factory: ``classes``, ``splits(...)``, plus
    ``samples`` (``(path, label)`` pairs; tk's feature cache fingerprints them)."""

    def __init__(self, path: str):
        self.path = Path(path)
        data = _read(self.path)
        root = self.path.parent.resolve()
        images = data.get("images")
        if not isinstance(images, list) or not images:
            self._fail('needs a non-empty list "images"')
        labels = [self._entry(i, e)[1] for i, e in enumerate(images)]
        classes = data.get("classes", list(dict.fromkeys(labels)))
        if (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
                or len(set(classes)) != len(classes)):
            self._fail('"classes" must be a list of distinct names')
        self.classes: list[str] = classes
        self.samples: list[tuple[str, int]] = []
        self.split_of: list[str | None] = []
        for i, entry in enumerate(images):
            rel, label, split = self._entry(i, entry)
            if label not in classes:
                self._fail(f"image {i} has label {label!r}, not one of \"classes\"")
            file = (root / rel).resolve()
            if not file.is_relative_to(root):
                self._fail(f"image {i} ({rel}) is outside the manifest's folder")
            if not file.is_file():
                self._fail(f"image {i}: {file} does not exist")
            self.samples.append((str(file), classes.index(label)))
            self.split_of.append(split)
        given = {s is not None for s in self.split_of}
        if given == {True, False}:
            self._fail('give "split" on every image or on none')

    def _fail(self, problem: str) -> None:
        raise DataError(f"manifest {self.path}: {problem}")

    def _entry(self, i: int, entry: Any) -> tuple[str, str, str | None]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("label"), str):
            self._fail(f'image {i} needs "path" and "label" strings')
        split = entry.get("split")
        if split not in (None, "train", "val"):
            self._fail(f'image {i} has split {split!r} (use "train" or "val")')
        return entry["path"], entry["label"], split

    def splits(self, train_transform: Any, eval_transform: Any, *, val_split: float,
               seed: int) -> tuple[Any, Any]:
        from toolkit.data.datasets import ImageListDataset
        from toolkit.data.splits import stratified_split

        if self.split_of[0] is not None:
            train = [s for s, part in zip(self.samples, self.split_of, strict=True)
                     if part == "train"]
            val = [s for s, part in zip(self.samples, self.split_of, strict=True)
                   if part == "val"]
        else:
            train_idx, val_idx = stratified_split([label for _, label in self.samples],
                                                  val_split, seed, class_names=self.classes)
            train = [self.samples[i] for i in train_idx]
            val = [self.samples[i] for i in val_idx]
        return ImageListDataset(train, train_transform), ImageListDataset(val, eval_transform)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():  # a FIFO or a folder is no manifest (and must not hang tk)
        raise DataError(f"manifest {path}: not a regular file")
    if path.stat().st_size > MAX_BYTES:
        raise DataError(f"manifest {path}: larger than {MAX_BYTES // 2**20} MiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"manifest {path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"manifest {path}: expected a JSON object with \"images\"")
    return data


def write_manifest(root: Path, files: list[tuple[Path, str]]) -> Path:
    """Write ``root/manifest.json`` listing ``(file, label)`` pairs (paths made relative)."""
    out = root / "manifest.json"
    images = [{"path": f.relative_to(root).as_posix(), "label": label} for f, label in files]
    out.write_text(json.dumps({"images": images}, indent=1) + "\n", encoding="utf-8")
    return out
