"""Seeded, stratified train/validation splits."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from toolkit.errors import DataError


def stratified_split(
    labels: Sequence[int], val_split: float, seed: int, *,
    class_names: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` of a seeded split that keeps class proportions.

    Each class sends ``round(n * val_split)`` of its ``n`` samples to validation, at least
    one and at most ``n - 1``; which ones depends only on ``seed``, the class and its
    members (not on other classes). Both lists come back sorted.

    Raises :class:`DataError` when ``val_split`` is not strictly between 0 and 1 or a class
    has fewer than 2 samples (it could not be in both parts); ``class_names`` makes that
    message name the class.
    """
    frac = _fraction(val_split)
    by_class: dict[int, list[int]] = {}
    for idx, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(idx)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        if n < 2:
            name = (class_names[label] if class_names is not None and 0 <= label < len(
                class_names) else str(label))
            raise DataError(
                f"class '{name}' has only {n} image; at least 2 are needed to split it into "
                f"training and validation (add images, or give an explicit validation folder)"
            )
        n_val = min(n - 1, max(1, int(round(n * frac))))
        order = list(members)
        random.Random(f"tk-split:{seed}:{label}:{n}").shuffle(order)
        val.extend(order[:n_val])
        train.extend(order[n_val:])
    return sorted(train), sorted(val)


def random_split(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` of a seeded random split of ``n`` samples (multi-label data,
    which has no single class to stratify by): ``round(n * val_split)`` go to validation,
    at least one and at most ``n - 1``. Both lists come back sorted."""
    frac = _fraction(val_split)
    if n < 2:
        raise DataError(f"{n} image(s): at least 2 are needed for a training and a "
                        "validation part")
    order = list(range(n))
    random.Random(f"tk-split:{seed}").shuffle(order)
    k = min(n - 1, max(1, round(n * frac)))
    return sorted(order[k:]), sorted(order[:k])


def _fraction(val_split: float) -> float:
    """``--val-split`` as a float strictly between 0 and 1, or a one-line error."""
    try:
        frac = float(val_split)
    except (TypeError, ValueError):
        raise DataError(f"--val-split must be a number between 0 and 1, got {val_split!r}") \
            from None
    if not 0.0 < frac < 1.0 or math.isnan(frac):
        raise DataError(f"--val-split must be between 0 and 1 (exclusive), got {val_split}")
    return frac
