"""Scores from logits, in one place (the runner, ``tk eval`` and the server call it).

Multi-label models (``meta["task"] == "multi-label"``) score every class on its own: the
sigmoid of its logit, and the class is predicted when the score reaches its threshold
(``meta["thresholds"]``, chosen per class on the validation split when the model was
trained). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass
class MultiLabelScore:
    """One image: ``labels`` (the classes at or above their threshold, best first, with
    their scores), ``top`` (the ``k`` best classes and scores whatever the thresholds)."""

    labels: list[tuple[str, float]]
    top: list[tuple[str, float]]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    z = np.asarray(logits, dtype=np.float32)
    return (1.0 / (1.0 + np.exp(-np.clip(z, -80, 80)))).astype(np.float32)


def thresholds_of(meta: dict[str, Any], num_classes: int) -> list[float] | None:
    """A model's per-class thresholds when it is multi-label (0.5 each when its metadata
    has none), else None."""
    if meta.get("task") != "multi-label":
        return None
    found = meta.get("thresholds")
    if isinstance(found, list) and len(found) == num_classes:
        return [float(t) for t in found]
    return [0.5] * num_classes


def multilabel_rows(logits: np.ndarray, thresholds: Sequence[float], classes: Sequence[str],
                    topk: int = 1) -> list[MultiLabelScore]:
    """Per row of ``logits [N, C]``: the predicted labels and the top ``topk`` classes, by
    sigmoid score (ties: the lower class index first), scores rounded to 6 digits."""
    import numpy as np

    probs = sigmoid(logits)
    cut = np.asarray(thresholds, dtype=np.float32)
    order = np.argsort(-probs, axis=1, kind="stable")
    out = []
    for j in range(len(probs)):
        ranked = [(classes[int(c)], round(float(probs[j, c]), 6)) for c in order[j]]
        chosen = [(classes[int(c)], round(float(probs[j, c]), 6)) for c in order[j]
                  if probs[j, c] >= cut[c]]
        out.append(MultiLabelScore(chosen, ranked[:topk]))
    return out
