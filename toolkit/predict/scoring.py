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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
