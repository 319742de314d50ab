"""One pass over the data: a training epoch (mixed precision, per-step LR, loss checks,
progress bar, gradient accumulation, and the recipes' per-batch hooks: ``mix`` for
MixUp/CutMix, ``after_step`` for the EMA) and an evaluation pass (loss, top-1, top-5,
confusion matrix; multi-label: exact match, mAP and F1, and a label co-occurrence matrix
``[true][predicted]``). Only what runs per batch lives here; the run around it is
:mod:`toolkit.train.trainer`."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit import distributed as D
from toolkit.devices import autocast, to_device
from toolkit.errors import TkError


class NonFiniteLossError(TkError):
    """The loss became NaN or infinite: the run diverged (``tk tune`` prunes such a
    trial instead of failing it)."""


SYNC_EVERY = 16  # steps between the device syncs that check the loss and update the bar


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 1% of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Schedule:
    """The LR schedule over the whole run, in optimizer steps."""

    lr: float
    steps_per_epoch: int
    total: int
    warmup: int

    @classmethod
    def make(cls, lr: float, batches_per_epoch: int, epochs: int, warmup_epochs: float,
             accumulate: int = 1) -> Schedule:
        """With gradient accumulation an optimizer step takes ``accumulate`` batches (the
        last step of an epoch may take fewer)."""
        steps_per_epoch = -(-batches_per_epoch // accumulate)
        warmup = int(round(warmup_epochs * steps_per_epoch)) if epochs > 1 else 0
        return cls(lr, steps_per_epoch, steps_per_epoch * epochs, warmup)

    def apply(self, opt: torch.optim.Optimizer, step: int) -> float:
        """Set every group's LR for ``step`` (relative to its own initial LR); return the
        head's LR."""
        f = lr_factor(step, self.total, self.warmup)
        for g in opt.param_groups:
            g["lr"] = g.get("initial_lr", g["lr"]) * f
        return self.lr * f


@dataclass
class Loop:
    """What every batch needs to know."""

    loss_fn: nn.Module
    num_classes: int
    device: torch.device
    precision: str
    channels_last: bool  # images (not cached feature vectors) in channels_last layout
    dist: D.DistInfo
    epochs: int
    quiet: bool = False
    non_finite_hint: str = "lower --lr, check the loss options, or use --precision 32"
    task: str = "single-label"  # or "multi-label": multi-hot targets, sigmoid scores
    accumulate: int = 1  # batches per optimizer step
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    after_step: Callable[[], None] | None = None  # after each optimizer step (EMA)
    last_outputs: Any = None  # multi-label: (probs, targets) of the last evaluation

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label"

    def _hits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Right answers in a batch: top-1 (against the largest share of a soft target);
        multi-label: images whose every label decision is right (exact match)."""
        if self.multi_label:
            return ((logits > 0) == (y > 0.5)).all(1).sum()
        if y.dim() == 2:
            return (logits.argmax(1) == y.argmax(1)).sum()
        return (logits.argmax(1) == y).sum()

    def _group(self, i: int, n: int) -> tuple[bool, bool, int]:
        """(first, last, size) of batch ``i``'s accumulation group among ``n`` batches."""
        start = i - i % self.accumulate
        size = min(self.accumulate, n - start)
        return i == start, i == start + size - 1, size

    def _inputs(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return to_device(x, self.device, self.channels_last), to_device(y, self.device)

    def train_epoch(self, net: nn.Module, loader: Any, opt: torch.optim.Optimizer,
                    scaler: Any, schedule: Schedule, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        lr = schedule.lr
        step = (epoch - 1) * schedule.steps_per_epoch
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.epochs}", unit="batch",
                   file=sys.stderr, leave=False, dynamic_ncols=True,
                   disable=self.quiet or not self.dist.is_main)
        batches = len(loader)
        for i, (x, y) in enumerate(bar):
            first, last, size = self._group(i, batches)
            if first:
                lr = schedule.apply(opt, step)
                opt.zero_grad(set_to_none=True)
            x, y = self._inputs(x, y)
            if self.mix is not None:
                x, y = self.mix(x, y)
            # DDP syncs gradients on the group's last batch only
            sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") \
                else net.no_sync()
            with sync:
                with autocast(self.device, self.precision):
                    logits = net(x)
                loss = self.loss_fn(logits.float(), y)
                scaler.scale(loss / size if size > 1 else loss).backward()
            if last:
                scaler.step(opt)
                scaler.update()
                step += 1
                if self.after_step is not None:
                    self.after_step()
            n = y.shape[0]
            seen += n
            loss_sum += loss.detach().double() * n
            correct += self._hits(logits.detach(), y)
            if i % SYNC_EVERY == SYNC_EVERY - 1 or i + 1 == len(loader):
                self._sync(bar, loss_sum, correct, seen, t0, epoch, i + 1)
        bar.close()
        totals = D.all_reduce_sum(torch.stack([loss_sum, correct.double(),
                                               torch.tensor(float(seen), dtype=torch.float64,
                                                            device=self.device)]))
        elapsed = time.perf_counter() - t0
        n_all = max(1.0, totals[2].item())
        return {
            "train_loss": totals[0].item() / n_all,
            "train_acc": totals[1].item() / n_all,
            "lr": lr,
            "images_per_s": n_all / max(elapsed, 1e-9),
        }

    def _sync(self, bar: Any, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int,
              t0: float, epoch: int, steps: int) -> None:
        """The one device sync per :data:`SYNC_EVERY` steps: check the loss, update the
        progress bar."""
        loss_total, correct_total = torch.stack([loss_sum, correct.double()]).tolist()
        if not math.isfinite(loss_total):
            raise NonFiniteLossError(
                f"the training loss became {loss_total} in epoch {epoch} (by step {steps}): "
                f"{self.non_finite_hint}; no model is saved")
        if not bar.disable:
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_total / seen:.3f}", acc=f"{correct_total / seen:.3f}",
                            img_s=f"{seen * self.dist.world_size / max(elapsed, 1e-9):.0f}")

    @torch.inference_mode()
    def evaluate(self, net: nn.Module, loader: Any, epoch: int | None = None
                 ) -> tuple[dict[str, float], torch.Tensor]:
        """Loss, top-1 (and top-5 with more than 5 classes) and the confusion matrix over the
        whole validation set (summed across ranks; every sample counted once)."""
        net.eval()
        c = self.num_classes
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        top5 = torch.zeros((), dtype=torch.int64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        exact = torch.zeros((), dtype=torch.int64, device=self.device)
        confusion = torch.zeros(c * c, dtype=torch.int64, device=self.device)
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for x, y in loader:
            x, y = self._inputs(x, y)
            with autocast(self.device, self.precision):
                logits = net(x)
            logits = logits.float()
            loss_sum += self.loss_fn(logits, y).double() * y.shape[0]
            count += y.shape[0]
            if self.multi_label:
                pred, truth = (logits > 0), (y > 0.5)
                confusion += (truth.T.double() @ pred.double()).round().long().view(-1)
                exact += (pred == truth).all(1).sum()
                outputs.append((torch.sigmoid(logits).cpu(), truth.cpu()))
                continue
            pred = logits.argmax(1)
            confusion += torch.bincount(y * c + pred, minlength=c * c)
            exact += (pred == y).sum()
            if c > 5:
                top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
        packed = D.all_reduce_sum(torch.cat([confusion.double(), loss_sum[None],
                                             top5.double()[None], count.double()[None],
                                             exact.double()[None]]))
        confusion = packed[: c * c].round().long().view(c, c).cpu()
        n = max(1, int(packed[c * c + 2].item()))
        metrics = {
            "val_loss": packed[c * c].item() / n,
            "val_acc": packed[c * c + 3].item() / n,
            "val_samples": n,
        }
        if self.multi_label:
            metrics.update(self._multilabel_metrics(outputs))
        elif c > 5:
            metrics["val_top5"] = packed[c * c + 1].item() / n
        if not math.isfinite(metrics["val_loss"]):
            when = f" in epoch {epoch}" if epoch is not None else ""
            raise NonFiniteLossError(f"the validation loss became {metrics['val_loss']}{when}: "
                          f"{self.non_finite_hint}; no model is saved")
        return metrics, confusion

    def _multilabel_metrics(self, outputs: list[tuple[torch.Tensor, torch.Tensor]]
                            ) -> dict[str, float]:
        """mAP and F1 at 0.5 over the whole validation set (every rank's part gathered);
        the scores are kept in :attr:`last_outputs` for the thresholds."""
        from toolkit.metrics import scores

        c = self.num_classes
        parts = D.all_gather_object(outputs) if self.dist.enabled else [outputs]
        probs = [p for part in parts for p, _ in part]
        truth = [t for part in parts for _, t in part]
        p = torch.cat(probs).numpy() if probs else torch.zeros(0, c).numpy()
        t = torch.cat(truth).numpy() if truth else torch.zeros(0, c).numpy()
        self.last_outputs = (p, t)
        s = scores(p, t, 0.5)
        return {"val_map": s.map, "val_f1_micro": s.f1_micro, "val_f1_macro": s.f1_macro}


def smallest_batch(loader: Any) -> int:
    """The smallest batch ``loader`` yields (per process)."""
    size = loader.batch_size
    if loader.drop_last:
        return size
    n = len(loader.sampler)
    return n % size or min(size, n)


def check_batch_norm(model: nn.Module, loader: Any) -> None:
    """BatchNorm in training mode cannot normalise a batch of one image: say so before the
    epoch starts instead of torch's "Expected more than 1 value per channel"."""
    if smallest_batch(loader) > 1:
        return
    training_bn = [m for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if training_bn:
        what = ("--batch-size 1" if loader.batch_size == 1
                else "the training split has 1 image per process")
        raise TkError(f"{what}: a batch of 1 image reaches {len(training_bn)} BatchNorm "
                      "layer(s) in training mode, which need at least 2; use --batch-size 2 "
                      "or more (or freeze the layer groups that hold them with --freeze)")
