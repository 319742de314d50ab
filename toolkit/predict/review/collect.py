"""What `tk review` measures per image: the labelled inputs (a class-per-sub-folder tree or
a ``path,label`` csv manifest), run through the same listing, decoding, error rows and
runner as `tk infer` (:class:`toolkit.predict.runner.Runner`), with each row's raw logits
and backbone features kept."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.data.listing import PathList, Warn, warn_stderr
from toolkit.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from toolkit.model.loading import LoadedModel


@dataclass
class Collected:
    """The readable images (``paths``, given ``labels``, ``logits [N, C]``, ``features
    [N, F]``) and the ones that could not be read (``failed``: ``{"path", "error"}``)."""

    paths: list[str]
    labels: np.ndarray
    logits: np.ndarray
    features: np.ndarray
    failed: list[dict[str, str]] = field(default_factory=list)


def read_manifest(path: str | os.PathLike[str], classes: list[str]) -> tuple[PathList, list[int]]:
    """A csv with ``path`` and ``label`` columns (other columns ignored; the label-issue
    csv `tk review` writes is one): relative paths are relative to the csv's folder."""
    manifest = Path(path)
    index = {c: i for i, c in enumerate(classes)}
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"--data {manifest}: expected a header with path and label "
                                "columns")
            paths, labels = PathList(), []
            for line, row in enumerate(reader, start=2):
                label = (row.get("label") or "").strip()
                if label not in index:
                    raise DataError(f"--data {manifest}:{line}: label {label!r} is not a "
                                    f"class of the model (its classes: {', '.join(classes)})")
                p = Path(row.get("path") or "")
                paths.append(p if p.is_absolute() else manifest.parent / p)
                labels.append(index[label])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read --data {manifest}: {exc}") from None
    if not len(paths):
        raise DataError(f"--data {manifest}: no rows")
    return paths, labels


def labelled_inputs(data: str | os.PathLike[str], classes: list[str], *,
                    warn: Warn = warn_stderr) -> tuple[PathList, list[int]]:
    """``(paths, label indices)`` of a class-folder tree (tk eval's listing) or a csv."""
    from toolkit.predict.evaluate import labelled_files

    if Path(data).suffix.lower() == ".csv" and Path(data).is_file():
        return read_manifest(data, classes)
    return labelled_files(data, classes, warn=warn)


def _with_features(model: Any) -> Any:
    """``model`` (a Classifier: ``backbone`` then ``head``) returning ``[logits |
    features]``: the runner keeps the columns after the logits as each row's features."""
    import torch
    from torch import nn

    class WithFeatures(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.inner.backbone(x)
            logits = self.inner.head(f)
            return torch.cat([logits.float(), f.flatten(1).float()], dim=1)

    return WithFeatures(model)


def collect(loaded: LoadedModel, paths: PathList, labels: list[int], *, batch_size: int = 32,
            device: Any = "auto", workers: int | None = None, warn: Warn = warn_stderr,
            progress: Any = None) -> Collected:
    """Run ``loaded`` over ``paths``; logits and features of every readable image."""
    import numpy as np

    from toolkit.data.transforms import eval_transform
    from toolkit.predict.runner import Runner
    from toolkit.predict.torch_runtime import TorchRuntime

    transform = eval_transform(loaded.data_config)
    runtime = TorchRuntime(_with_features(loaded.model), transform, device=device)
    runner = Runner(runtime, transform, loaded.classes, batch_size=batch_size, workers=workers,
                    warn=warn, keep_outputs=True)
    kept, ys, logits, feats = [], [], [], []
    failed: list[dict[str, str]] = []
    rows = runner.predict_paths(paths)
    try:
        for row in rows:
            if progress is not None:
                progress.update(1)
            if row.error is not None:
                failed.append({"path": str(row.path), "error": row.error})
                continue
            kept.append(str(row.path))
            ys.append(labels[row.index])
            logits.append(row.logits)
            feats.append(row.features)
    finally:
        rows.close()
    c = len(loaded.classes)
    return Collected(kept, np.asarray(ys, dtype=np.int64),
                     np.stack(logits) if logits else np.zeros((0, c), np.float32),
                     np.stack(feats) if feats else np.zeros((0, 0), np.float32), failed)


def features_of(loaded: LoadedModel, paths: PathList, *, batch_size: int = 32,
                device: Any = "auto", workers: int | None = None) -> tuple[list[str], np.ndarray]:
    """Backbone features of the readable images among ``paths`` (the training images, for
    the leakage check); unreadable ones are skipped quietly."""
    got = collect(loaded, paths, [0] * len(paths), batch_size=batch_size, device=device,
                  workers=workers, warn=lambda _m: None)
    return got.paths, got.features
