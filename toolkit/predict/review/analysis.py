"""The numbers of a `tk review` report, from the collected logits and features
(:mod:`toolkit.predict.review.collect`); no HTML here.

- metrics: scikit-learn (precision / recall / F1 / support, confusion matrix, top-5);
- most-confused pairs and top losses: from the calibrated scores (what `tk infer` writes);
- likely label errors: confident learning (Northcutt et al. 2021): class ``j`` is
  *confidently* present in an image when ``p_j`` reaches the class's threshold ``t_j``, the
  mean ``p_j`` over the images labelled ``j``; an image whose given label is not among its
  confident classes while another is, is a likely error, ranked by the score of its given
  label (lowest first);
- near-duplicates: cosine similarity of the backbone features, centred on the mean feature
  of the reviewed images (features after a ReLU all point into one orthant, so raw cosines
  are all high), at or above :data:`DUPLICATE_COSINE`, within the reviewed images and
  against the training images;
- calibration: ECE and reliability bins with the raw softmax and with the model's
  temperature (:mod:`toolkit.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.calibration import ECE_BINS, Bin, expected_calibration_error, reliability_bins
from toolkit.errors import TkError
from toolkit.predict.scoring import Scoring

if TYPE_CHECKING:
    import numpy as np

    from toolkit.predict.review.collect import Collected

DUPLICATE_COSINE = 0.98  # the stated threshold of "near-duplicate"
MAX_PAIRS = 200  # duplicate pairs listed at most (the count is always given)
PAIR_EXAMPLES = 6  # thumbnails per most-confused pair


@dataclass
class Review:
    model: str
    data: str
    classes: list[str]
    paths: list[str]
    labels: list[int]
    predicted: list[int]
    scores: list[float]  # calibrated top score
    failed: list[dict[str, str]]
    accuracy: float
    macro_f1: float
    top5: float | None
    per_class: list[dict[str, Any]]
    confusion: list[list[int]]
    confused_pairs: list[dict[str, Any]]
    top_losses: list[dict[str, Any]]
    label_issues: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]  # within the reviewed images: {"a", "b", "cosine"}
    duplicates_total: int
    train_duplicates: list[dict[str, Any]]  # {"a", "train", "cosine"}
    train_duplicates_total: int
    train_note: str
    calibration: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    threshold: float = DUPLICATE_COSINE

    @property
    def images(self) -> int:
        return len(self.paths)


def _sklearn() -> Any:
    try:
        import sklearn.metrics as m
    except ImportError:
        raise TkError("tk review needs scikit-learn: pip install 'tk[review]'") from None
    return m


def label_issues(probs: np.ndarray, labels: np.ndarray) -> list[int]:
    """Indices of likely label errors, most likely first (see the module doc)."""
    import numpy as np

    n, c = probs.shape
    if not n:
        return []
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0
                           for j in range(c)])
    confident = probs >= thresholds[None, :]
    given = probs[np.arange(n), labels]
    others = confident.copy()
    others[np.arange(n), labels] = False
    flagged = others.any(axis=1) & (probs.argmax(axis=1) != labels)
    order = np.argsort(given[flagged], kind="stable")
    return [int(i) for i in np.flatnonzero(flagged)[order]]


def near_duplicates(a: np.ndarray, b: np.ndarray | None = None,
                    threshold: float = DUPLICATE_COSINE, chunk: int = 1024
                    ) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)`` with cosine >= ``threshold``: within ``a`` (``i < j``) when
    ``b`` is None, else between ``a[i]`` and ``b[j]``; most similar first. Both sets are
    centred on the mean of ``a`` first."""
    import numpy as np

    centre = a.astype(np.float32).mean(axis=0, keepdims=True) if len(a) > 1 else 0.0

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) - centre
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    ua = unit(a)
    ub = ua if b is None else unit(b)
    out: list[tuple[int, int, float]] = []
    for s in range(0, len(ua), chunk):
        sim = ua[s:s + chunk] @ ub.T
        ii, jj = np.nonzero(sim >= threshold)
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            if b is None and s + i >= j:
                continue
            out.append((s + i, j, float(sim[i, j])))
    out.sort(key=lambda t: -t[2])
    return out


def _bins(bins: list[Bin]) -> list[dict[str, float]]:
    return [{"lo": b.lo, "hi": b.hi, "count": b.count, "confidence": b.confidence,
             "accuracy": b.accuracy} for b in bins]


def analyse(got: Collected, *, model: str, data: str, classes: list[str],
            meta: dict[str, Any], top_losses: int = 24,
            train: tuple[list[str], np.ndarray] | None = None, train_note: str = ""
            ) -> Review:
    """Every number of the report."""
    import numpy as np

    m = _sklearn()
    c = len(classes)
    y = got.labels
    scoring = Scoring.for_model(meta)
    probs = scoring.probabilities(got.logits) if len(y) else np.zeros((0, c), np.float32)
    raw = Scoring().probabilities(got.logits) if len(y) else probs
    pred = probs.argmax(axis=1) if len(y) else np.zeros(0, np.int64)
    ids = list(range(c))
    if len(y):
        prec, rec, f1, sup = m.precision_recall_fscore_support(y, pred, labels=ids,
                                                               zero_division=0)
        confusion = m.confusion_matrix(y, pred, labels=ids).tolist()
        accuracy = float(m.accuracy_score(y, pred))
        present = sorted(set(y.tolist()) | set(pred.tolist()))
        macro_f1 = float(np.mean([f1[i] for i in present]))
        top5 = (float(m.top_k_accuracy_score(y, probs, k=5, labels=ids)) if c > 5 else None)
    else:
        prec = rec = f1 = np.zeros(c)
        sup = np.zeros(c, dtype=int)
        confusion = [[0] * c for _ in range(c)]
        accuracy, macro_f1, top5 = 0.0, 0.0, None
    per_class = [{"name": classes[i], "precision": float(prec[i]), "recall": float(rec[i]),
                  "f1": float(f1[i]), "support": int(sup[i])} for i in ids]

    pairs = sorted(((confusion[t][p], t, p) for t in ids for p in ids
                    if t != p and confusion[t][p]), key=lambda x: (-x[0], x[1], x[2]))
    confused = []
    for count, t, p in pairs[:10]:
        which = np.flatnonzero((y == t) & (pred == p))
        which = which[np.argsort(-probs[which, p], kind="stable")][:PAIR_EXAMPLES]
        confused.append({"true": classes[t], "predicted": classes[p], "count": int(count),
                         "examples": [int(i) for i in which]})

    n = len(y)
    given = probs[np.arange(n), y] if n else np.zeros(0)
    loss = -np.log(np.clip(given, 1e-12, 1.0))
    order = np.argsort(-loss, kind="stable")[:max(0, top_losses)]
    losses = [{"index": int(i), "true": classes[y[i]], "predicted": classes[pred[i]],
               "score": float(probs[i, pred[i]]), "given_score": float(given[i]),
               "loss": float(loss[i])} for i in order]

    issues = [{"index": i, "given": classes[y[i]], "suggested": classes[pred[i]],
               "given_score": float(given[i]), "suggested_score": float(probs[i, pred[i]])}
              for i in label_issues(probs, y)]

    within = near_duplicates(got.features) if n > 1 else []
    dups = [{"a": i, "b": j, "cosine": s} for i, j, s in within[:MAX_PAIRS]]
    train_dups: list[dict[str, Any]] = []
    train_total = 0
    if train is not None and len(train[0]) and n:
        found = near_duplicates(got.features, train[1])
        train_total = len(found)
        train_dups = [{"a": i, "train": train[0][j], "cosine": s}
                      for i, j, s in found[:MAX_PAIRS]]

    t = scoring.temperature
    calibration = {
        "temperature": t, "fitted": meta.get("calibration"), "bins": ECE_BINS,
        "ece_raw": expected_calibration_error(raw, y) if n else 0.0,
        "ece_calibrated": expected_calibration_error(probs, y) if n else 0.0,
        "bins_raw": _bins(reliability_bins(raw, y)) if n else [],
        "bins_calibrated": _bins(reliability_bins(probs, y)) if n else [],
    }
    history = list((meta.get("metrics") or {}).get("history") or [])
    return Review(model=model, data=data, classes=classes, paths=got.paths,
                  labels=[int(v) for v in y], predicted=[int(v) for v in pred],
                  scores=[float(probs[i, pred[i]]) for i in range(n)], failed=got.failed,
                  accuracy=accuracy, macro_f1=macro_f1, top5=top5, per_class=per_class,
                  confusion=confusion, confused_pairs=confused, top_losses=losses,
                  label_issues=issues, duplicates=dups, duplicates_total=len(within),
                  train_duplicates=train_dups, train_duplicates_total=train_total,
                  train_note=train_note, calibration=calibration, history=history)
