"""Confidence calibration, the math alone (numpy, no torch): the softmax with a temperature,
fitting that temperature (Guo et al. 2017, "On calibration of modern neural networks"), and
the expected calibration error with its reliability bins.

It sits below training and prediction so both use the same numbers: ``tk finetune`` fits
the temperature on its validation split (:mod:`toolkit.train.calibrate`) and records the
ECE before and after; :mod:`toolkit.predict.scoring` turns logits into the scores every
prediction command writes; `tk review` draws the reliability diagram from these bins.

```python
probs = softmax(logits, temperature=1.7)          # [N, C] rows summing to 1
t = fit_temperature(val_logits, val_labels)       # the T minimising the validation NLL
ece = expected_calibration_error(probs, labels)   # 15 equal-width confidence bins
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ECE_BINS = 15
# the search range of the temperature: wide enough for any trained classifier; a value at
# a bound means the logits carry (almost) no information about correctness
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, in float32 (stable: the row
    maximum is subtracted first)."""
    import numpy as np

    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    z = np.asarray(logits, dtype=np.float32)
    if temperature != 1.0:
        z = z / np.float32(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``
    (float64, log-sum-exp)."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    y = np.asarray(labels, dtype=np.int64)
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in ``[T_MIN, T_MAX]`` minimising the NLL of ``labels``.

    The NLL is convex in ``1/T`` (a log-sum-exp of linear functions minus a linear one), so
    a golden-section search over ``1/T`` finds the minimum; deterministic, numpy only."""
    if len(labels) == 0:
        return 1.0
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    g = (math.sqrt(5) - 1) / 2

    def f(beta: float) -> float:
        return nll(logits, labels, 1.0 / beta)

    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
        if b - a < 1e-6:
            break
    beta = (a + b) / 2
    return float(1.0 / beta)


@dataclass
class Bin:
    """One confidence bin of a reliability diagram: ``(lo, hi]`` (the first includes 0)."""

    lo: float
    hi: float
    count: int
    confidence: float  # mean top score in the bin (0 when empty)
    accuracy: float  # fraction of correct top-1 predictions in the bin (0 when empty)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
                     ) -> list[Bin]:
    """Equal-width bins of the top score, each with its mean confidence and accuracy."""
    import numpy as np

    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == np.asarray(labels)) if len(p) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin k holds (edges[k], edges[k+1]]; a confidence of exactly 0 goes into the first
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        mask = which == k
        n = int(mask.sum())
        out.append(Bin(float(edges[k]), float(edges[k + 1]), n,
                       float(conf[mask].mean()) if n else 0.0,
                       float(correct[mask].mean()) if n else 0.0))
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the
    equal-width bins of :func:`reliability_bins` (0 is perfectly calibrated)."""
    found = reliability_bins(probs, labels, bins)
    total = sum(b.count for b in found)
    if not total:
        return 0.0
    return float(sum(b.count * abs(b.accuracy - b.confidence) for b in found) / total)


def _at(bound: float, t: float, logits: np.ndarray, labels: np.ndarray) -> bool:
    """Whether the fit ended at ``bound``: within 10 % of it, or where the NLL is as flat
    as at the bound itself (the search cannot tell them apart)."""
    if abs(math.log(t / bound)) < math.log(1.1):
        return True
    return abs(math.log(t / bound)) < math.log(2.0) and (
        nll(logits, labels, bound) <= nll(logits, labels, t) + 1e-9)


# fewer validation images than this and the fitted temperature is not used (the NLL of a
# handful of images says little about the scores of new ones)
MIN_IMAGES = 10


def calibration_record(logits: np.ndarray, labels: np.ndarray) -> dict[str, float | int | str]:
    """Fit the temperature on ``(logits, labels)`` and describe it: the
    ``meta["calibration"]`` record ``{"method": "temperature", "temperature", "ece_before",
    "ece_after", "nll_before", "nll_after", "images", "bins"}``.

    The fitted value is kept only when it can be trusted; otherwise ``temperature`` is 1.0
    (scores stay the plain softmax), the fitted value goes into ``fitted`` and the reason
    into ``rejected``: fewer than :data:`MIN_IMAGES` images, a value at a bound of the
    search, or an ECE that rises with it (a small split where the NLL and the binned ECE
    disagree). At the upper bound the logits say almost nothing about correctness (every
    score would be flattened towards 1/classes); the lower bound is where a validation
    split the model classifies without error sends the fit (the NLL keeps falling as T goes
    to 0), and every score would read 1.0."""
    t = fit_temperature(logits, labels)
    ece_before = expected_calibration_error(softmax(logits), labels)
    ece_fitted = expected_calibration_error(softmax(logits, t), labels)
    rejected = None
    if len(labels) < MIN_IMAGES:
        rejected = f"fewer than {MIN_IMAGES} validation images"
    elif _at(T_MAX, t, logits, labels):
        rejected = f"the fit ran to the upper bound {T_MAX:g}"
    elif _at(T_MIN, t, logits, labels):
        rejected = (f"the fit ran to the lower bound {T_MIN:g} (a split classified without "
                    "error: every score would read 1.0)")
    elif ece_fitted > ece_before:
        rejected = "it raised the validation ECE"
    used = 1.0 if rejected else t
    record: dict[str, float | int | str] = {
        "method": "temperature", "temperature": round(used, 6),
        "ece_before": round(ece_before, 6),
        "ece_after": round(ece_fitted if not rejected else ece_before, 6),
        "nll_before": round(nll(logits, labels), 6),
        "nll_after": round(nll(logits, labels, used), 6),
        "images": int(len(labels)), "bins": ECE_BINS}
    if rejected:
        record["fitted"] = round(t, 6)
        record["rejected"] = rejected
    return record
