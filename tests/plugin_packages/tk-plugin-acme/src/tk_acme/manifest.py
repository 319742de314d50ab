"""The ``acme-json`` dataset: ``{"images": [{"path": "a/1.png", "label": "cat"}, ...]}``,
paths relative to the manifest's folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.data.datasets import ImageListDataset
from toolkit.data.splits import stratified_split
from toolkit.errors import DataError


class JsonManifest:
    def __init__(self, path: str | None):
        if path is None:
            raise DataError("dataset 'acme-json' needs a manifest: --data FILE.json")
        root = Path(path).parent
        items = json.loads(Path(path).read_text(encoding="utf-8"))["images"]
        self.classes = sorted({item["label"] for item in items})
        self.samples = [(str(root / item["path"]), self.classes.index(item["label"]))
                        for item in items]

    def splits(self, train_transform: Any, eval_transform: Any, *, val_split: float,
               seed: int) -> tuple[Any, Any]:
        train, val = stratified_split([label for _, label in self.samples], val_split, seed)
        return (ImageListDataset([self.samples[i] for i in train], train_transform),
                ImageListDataset([self.samples[i] for i in val], eval_transform))
