"""Logits -> the scores and labels every prediction command writes (`tk infer`, `tk eval`,
`tk review`, `tk serve`): the one place where scores are computed.

- **Calibration.** A model trained by ``tk finetune`` carries ``meta["calibration"]``
  (``{"method": "temperature", "temperature": T, ...}``, fitted on its validation split);
  its scores are ``softmax(logits / T)``. ``calibrated=False`` (``--no-calibration``) gives
  the raw softmax. A model without the record scores with ``T = 1``.
- **Unknown.** With ``min_score`` (``--min-score S``), a row whose top score is below ``S``
  gets no label (``label`` null in json/jsonl, ``unknown`` in the table and csv); its
  ``score`` and ``topk`` are kept, so nothing is hidden.

```python
scoring = Scoring.for_model(loaded.meta, calibrated=True, min_score=0.5)
probs = scoring.probabilities(logits)            # [N, C]
scores, ids = top_k(probs, 3)                    # best first
label = scoring.label(classes[ids[0, 0]], scores[0, 0])   # None below min_score
```
- **Multi-label** models (``meta["task"] == "multi-label"``) score every class on its own:
  the sigmoid of its logit, and the class is predicted when the score reaches its threshold
  (``meta["thresholds"]``, chosen per class on the validation split when the model was
  trained). Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toolkit.calibration import softmax
from toolkit.errors import TkError

if TYPE_CHECKING:
    import numpy as np

UNKNOWN = "unknown"  # how the table and csv writers show a row without a label


def model_temperature(meta: Mapping[str, Any]) -> float:
    """The temperature recorded in a model's metadata (1.0 when none or not usable)."""
    record = meta.get("calibration")
    if not isinstance(record, Mapping) or record.get("method") != "temperature":
        return 1.0
    t = record.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0:
        return float(t)
    return 1.0


def check_min_score(min_score: float | None) -> float | None:
    if min_score is None:
        return None
    if not (isinstance(min_score, (int, float)) and math.isfinite(min_score)
            and 0.0 <= min_score <= 1.0):
        raise TkError(f"--min-score must be between 0 and 1, got {min_score}")
    return float(min_score)


@dataclass(frozen=True)
class Scoring:
    """How logits become scores and a label: ``temperature`` (1.0: the plain softmax) and
    ``min_score`` (None: always a label)."""

    temperature: float = 1.0
    min_score: float | None = None

    @classmethod
    def for_model(cls, meta: Mapping[str, Any], *, calibrated: bool = True,
                  min_score: float | None = None) -> Scoring:
        """The scoring of a stored model: its calibration temperature unless
        ``calibrated`` is False."""
        return cls(model_temperature(meta) if calibrated else 1.0, check_min_score(min_score))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """``[N, C]`` class probabilities of ``logits [N, C]``."""
        return softmax(logits, self.temperature)

    def label(self, best: str, score: float) -> str | None:
        """``best`` (the top class), or None when its score is below ``min_score``."""
        if self.min_score is not None and score < self.min_score:
            return None
        return best

    def describe(self) -> str:
        parts = [f"temperature {self.temperature:g}" if self.temperature != 1.0
                 else "uncalibrated softmax"]
        if self.min_score is not None:
            parts.append(f"label unknown below {self.min_score:g}")
        return ", ".join(parts)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of ``probs [N, C]``: ``(scores [N, k], class indices [N, k])``, best
    first (ties: the lower class index first)."""
    import numpy as np

    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(probs, order, axis=1), order


def rows_of(logits: np.ndarray, classes: list[str], k: int, scoring: Scoring
         ) -> list[tuple[str | None, float, list[tuple[str, float]]]]:
    """``(label, score, topk)`` per row of ``logits`` (scores rounded to 6 decimals)."""
    scores, ids = top_k(scoring.probabilities(logits), k)
    out = []
    for j in range(len(scores)):
        top = [(classes[int(c)], round(float(s), 6))
               for s, c in zip(scores[j], ids[j], strict=True)]
        out.append((scoring.label(*top[0]), top[0][1], top))
    return out


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
