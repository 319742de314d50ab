"""Multi-label metrics and decision thresholds, from scikit-learn (the ``[multilabel]``
extra): one copy shared by training (per-epoch validation, thresholds chosen at the end)
and ``tk eval``.

Inputs are NumPy arrays: ``probs [N, C]`` (sigmoid scores), ``targets [N, C]`` (0/1).
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError

if TYPE_CHECKING:
    import numpy as np

EXTRA = "multilabel"


def _sklearn() -> Any:
    try:
        from sklearn import metrics
    except ImportError:
        raise TkError("multi-label metrics need scikit-learn: pip install "
                      f"'tk-microtoolkit[{EXTRA}]'") from None
    return metrics


@dataclass
class MultiLabelScores:
    """mAP (macro average precision over the classes that have positives), micro and macro
    F1 at the given thresholds, exact-match accuracy, and per class: AP (None for a class
    without positives), precision, recall, F1, support."""

    map: float
    f1_micro: float
    f1_macro: float
    exact_match: float
    ap: list[float | None]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]


def scores(probs: np.ndarray, targets: np.ndarray, thresholds: Any = 0.5) -> MultiLabelScores:
    import numpy as np

    m = _sklearn()
    probs = np.asarray(probs, dtype=np.float64)
    y = (np.asarray(targets) > 0.5).astype(np.int64)
    n, c = y.shape
    pred = (probs >= np.asarray(thresholds, dtype=np.float64)).astype(np.int64)
    support = y.sum(axis=0)
    ap: list[float | None] = []
    for k in range(c):
        ap.append(float(m.average_precision_score(y[:, k], probs[:, k]))
                  if support[k] > 0 else None)
    known = [a for a in ap if a is not None]
    p, r, f, _ = m.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    return MultiLabelScores(
        map=float(np.mean(known)) if known else 0.0,
        f1_micro=float(m.f1_score(y, pred, average="micro", zero_division=0)),
        f1_macro=float(m.f1_score(y, pred, average="macro", zero_division=0)),
        exact_match=float((pred == y).all(axis=1).mean()) if n else 0.0,
        ap=ap, precision=[float(v) for v in p], recall=[float(v) for v in r],
        f1=[float(v) for v in f], support=[int(v) for v in support])


def best_f1_thresholds(probs: np.ndarray, targets: np.ndarray, default: float = 0.5
                       ) -> list[float]:
    """Per class, the score threshold that maximises F1 on (``probs``, ``targets``)
    (``default`` for a class without positives). A threshold sits halfway between the
    chosen score and the next lower one, so it is not fitted to one image's exact value."""
    import numpy as np

    m = _sklearn()
    probs = np.asarray(probs, dtype=np.float64)
    y = (np.asarray(targets) > 0.5).astype(np.int64)
    out: list[float] = []
    for k in range(y.shape[1]):
        if not y[:, k].any():
            out.append(default)
            continue
        precision, recall, cuts = m.precision_recall_curve(y[:, k], probs[:, k])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1[:-1])) if len(cuts) else 0
        cut = float(cuts[best]) if len(cuts) else default
        lower = probs[:, k][probs[:, k] < cut]
        if len(lower):
            cut = (cut + float(lower.max())) / 2
        out.append(round(min(max(cut, 1e-6), 1 - 1e-6), 6))
    return out
