"""Class imbalance: how many training images each class has (said at the start of a run,
with a warning past :data:`IMBALANCE_WARNING` x), loss weights (``--class-weights``) and
per-image sampling weights (``--sampler balanced``). Multi-label targets count an image
once for each of its labels. Nothing here imports torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from toolkit.errors import TkError

IMBALANCE_WARNING = 10.0  # largest / smallest class
EFFECTIVE_BETA = 0.999  # Cui et al. 2019, "effective number of samples"


def targets_of(dataset: Any) -> list[Any] | None:
    """Each training image's label (an int, or a tuple of ints for multi-label data) when
    the dataset can say it without decoding images (``targets``, or a generated dataset
    whose generator has ``label(i)``); None otherwise."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return list(targets)
    make, indices = getattr(dataset, "make", None), getattr(dataset, "indices", None)
    label = getattr(make, "label", None)
    if callable(label) and indices is not None:
        return [int(label(i)) for i in indices]
    return None


def class_counts(targets: Sequence[Any], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for t in targets:
        for c in (t if isinstance(t, (tuple, list)) else (t,)):
            counts[int(c)] += 1
    return counts


def describe_counts(counts: Sequence[int], classes: Sequence[str], limit: int = 12) -> str:
    """``train images per class: a 90, b 9 (largest/smallest 10.0x)``."""
    shown = ", ".join(f"{c} {n}" for c, n in zip(classes[:limit], counts[:limit], strict=False))
    if len(classes) > limit:
        shown += f", ... ({len(classes) - limit} more)"
    return f"train images per class: {shown}{_ratio_note(counts)}"


def _ratio_note(counts: Sequence[int]) -> str:
    present = [n for n in counts if n > 0]
    if not present:
        return ""
    return f" (largest/smallest {max(present) / min(present):.1f}x)"


def check_counts(counts: Sequence[int], classes: Sequence[str], log: Callable[[str], None],
                 recipes: bool) -> None:
    """Say the counts; warn when a class has no training image or the largest class is
    more than :data:`IMBALANCE_WARNING` times the smallest (unless a recipe for it is on)."""
    log(describe_counts(counts, classes))
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        log(f"warning: no training image for class(es) {', '.join(empty[:12])}")
    present = [n for n in counts if n > 0]
    if present and max(present) > IMBALANCE_WARNING * min(present) and not recipes:
        big = classes[counts.index(max(present))]
        small = classes[counts.index(min(present))]
        log(f"warning: the classes are imbalanced ({big}: {max(present)} images, {small}: "
            f"{min(present)}); consider --class-weights auto or --sampler balanced")


def loss_weights(counts: Sequence[int], total: int, kind: str, multi_label: bool
                 ) -> list[float]:
    """Per-class loss weights. Single-label: ``auto`` = inverse frequency
    ``total / (C * n_c)``; ``effective`` = ``(1 - beta) / (1 - beta ** n_c)`` scaled to mean
    1. Multi-label (the losses' ``pos_weight``): ``auto`` = negatives / positives of each
    class; ``effective`` = the effective-number weights. A class without images gets 0
    (single-label) or 1 (multi-label)."""
    c = len(counts)
    if kind == "effective":
        raw = [(1 - EFFECTIVE_BETA) / (1 - EFFECTIVE_BETA ** n) if n else 0.0 for n in counts]
        present = [w for w in raw if w]
        mean = sum(present) / len(present) if present else 1.0
        return [round(w / mean, 6) if w else (1.0 if multi_label else 0.0) for w in raw]
    if kind != "auto":
        raise TkError(f"--class-weights {kind}: expected auto or effective")
    if multi_label:
        return [round((total - n) / n, 6) if n else 1.0 for n in counts]
    return [round(total / (c * n), 6) if n else 0.0 for n in counts]


def sample_weights(targets: Sequence[Any], counts: Sequence[int]) -> list[float]:
    """Per-image weights that make every class equally likely to be drawn: ``1 / n_c`` of
    its class; a multi-label image takes its rarest label's weight, and images without a
    label are weighted as one more class."""
    empty = sum(1 for t in targets if isinstance(t, (tuple, list)) and not t)
    out = []
    for t in targets:
        labels = t if isinstance(t, (tuple, list)) else (t,)
        if not labels:
            out.append(1.0 / empty)
        else:
            out.append(max(1.0 / counts[int(c)] for c in labels))
    return out
