"""Where a run stands: the epochs done and their metrics, the best epoch (by validation
accuracy, or the ``monitor`` metric: mAP for multi-label) with its weights and confusion
matrix, and early stopping. Its checkpoint form, and the checks a checkpoint read back
must pass before a run continues from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError

if TYPE_CHECKING:
    import torch
    from torch import nn

REQUIRED_METRICS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")


@dataclass
class Progress:
    epoch: int = 0  # the last finished epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_confusion: list[list[int]] | None = None
    best_state: dict[str, torch.Tensor] | None = None  # CPU copy of the best weights
    monitor: str = "val_acc"  # the metric that picks the best epoch (higher is better)

    @property
    def best_acc(self) -> float:
        """The best epoch's ``monitor`` metric (-1 before any epoch)."""
        return (float(self.history[self.best_epoch - 1][self.monitor]) if self.best_epoch
                else -1.0)

    @property
    def best_metrics(self) -> dict[str, Any]:
        return self.history[self.best_epoch - 1]

    @property
    def since_best(self) -> int:
        return self.epoch - self.best_epoch

    def record(self, epoch: int, metrics: dict[str, Any], confusion: torch.Tensor,
               model: nn.Module) -> bool:
        """Add a finished epoch; keep its weights when it is the best so far."""
        improved = metrics[self.monitor] > self.best_acc
        self.history.append(metrics)
        self.epoch = epoch
        if improved:
            self.best_epoch = epoch
            self.best_confusion = confusion.tolist()
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items()}
        return improved

    def should_stop(self, patience: int | None, epochs: int) -> bool:
        """Early stopping: ``patience`` epochs without a val-accuracy gain (never after
        the last epoch: there is nothing left to skip)."""
        return bool(patience) and self.since_best >= patience and self.epoch < epochs

    # -- checkpoint form ---------------------------------------------------------------
    def to_checkpoint(self, current: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able state, best weights). The best weights are stored only where they
        differ from ``current`` (the model's state now): when the last epoch is the best,
        or for a frozen backbone, nothing is stored twice."""
        best: dict[str, torch.Tensor] = {}
        for key, tensor in (self.best_state or {}).items():
            now = current.get(key)
            if now is None or not _same(tensor, now):
                best[key] = tensor
        state = {"epoch": self.epoch, "history": self.history, "best_epoch": self.best_epoch,
                 "best_confusion": self.best_confusion}
        return state, best

    @classmethod
    def from_checkpoint(cls, state: Any, best: Any, current: dict[str, torch.Tensor], *,
                        epochs: int, num_classes: int, monitor: str = "val_acc") -> Progress:
        """Validate a checkpoint's progress (types, ranges, consistency) against this run
        (``epochs``, ``num_classes``, the model's loaded ``current`` state); a
        :class:`TkError` saying what is wrong otherwise."""
        import torch

        _need(isinstance(state, dict) and set(state) == {"epoch", "history", "best_epoch",
                                                          "best_confusion"},
              "its training state is malformed")
        epoch, history = state["epoch"], state["history"]
        _need(_is_int(epoch) and 1 <= epoch, f"epoch {epoch!r} is not a finished epoch")
        _need(epoch <= epochs, f"it is at epoch {epoch} but this run has --epochs {epochs}")
        _need(isinstance(history, list) and len(history) == epoch,
              f"its history does not have one entry per epoch (epoch {epoch})")
        for i, metrics in enumerate(history, start=1):
            _check_metrics(metrics, i)
            _need(monitor in metrics, f"the metrics of epoch {i} have no {monitor}")
        best_epoch = state["best_epoch"]
        _need(_is_int(best_epoch) and 1 <= best_epoch <= epoch,
              f"best epoch {best_epoch!r} is not one of its epochs 1..{epoch}")
        accs = [m[monitor] for m in history]
        _need(accs[best_epoch - 1] == max(accs) and accs.index(max(accs)) == best_epoch - 1,
              f"best epoch {best_epoch} is not the epoch with the best {monitor}")
        confusion = state["best_confusion"]
        _need(isinstance(confusion, list) and len(confusion) == num_classes
              and all(isinstance(row, list) and len(row) == num_classes
                      and all(_is_int(v) and v >= 0 for v in row) for row in confusion),
              f"its confusion matrix is not {num_classes} x {num_classes} counts")
        _need(isinstance(best, dict) and all(
            isinstance(k, str) and k in current and isinstance(t, torch.Tensor)
            and t.shape == current[k].shape and t.dtype == current[k].dtype
            for k, t in best.items()), "its best weights do not fit the model")
        best_state = {k: (best[k] if k in best else v.detach().to("cpu", copy=True))
                      for k, v in current.items()}
        return cls(epoch=epoch, history=history, best_epoch=best_epoch,
                   best_confusion=confusion, best_state=best_state, monitor=monitor)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.detach()
    return a.shape == b.shape and a.dtype == b.dtype and bool(a.equal(b.to(a.device)))


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise TkError(message)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _check_metrics(metrics: Any, epoch: int) -> None:
    _need(isinstance(metrics, dict) and all(k in metrics for k in REQUIRED_METRICS),
          f"the metrics of epoch {epoch} are incomplete")
    for key, value in metrics.items():
        _need(isinstance(key, str) and isinstance(value, (int, float))
              and not isinstance(value, bool) and math.isfinite(value),
              f"metric {key!r} of epoch {epoch} is not a finite number ({value!r})")
    _need(metrics["epoch"] == epoch and _is_int(metrics["epoch"]),
          f"the metrics of epoch {epoch} say epoch {metrics['epoch']!r}")
    for key in ("train_acc", "val_acc"):
        _need(0 <= metrics[key] <= 1, f"{key} {metrics[key]!r} of epoch {epoch} is not in 0..1")
