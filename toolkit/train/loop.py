"""One pass over the data: a training epoch (mixed precision, per-step LR, loss checks,
progress bar) and an evaluation pass (loss, top-1, top-5, confusion matrix). Only what
runs per batch lives here; the run around it is :mod:`toolkit.train.trainer`."""

from __future__ import annotations

import math
import sys
import time
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
    def make(cls, lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: float
             ) -> Schedule:
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
        for i, (x, y) in enumerate(bar):
            lr = schedule.apply(opt, step)
            x, y = self._inputs(x, y)
            with autocast(self.device, self.precision):
                logits = net(x)
            loss = self.loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            n = y.shape[0]
            seen += n
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
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
        confusion = torch.zeros(c * c, dtype=torch.int64, device=self.device)
        for x, y in loader:
            x, y = self._inputs(x, y)
            with autocast(self.device, self.precision):
                logits = net(x)
            logits = logits.float()
            loss_sum += self.loss_fn(logits, y).double() * y.shape[0]
            pred = logits.argmax(1)
            confusion += torch.bincount(y * c + pred, minlength=c * c)
            if c > 5:
                top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
        packed = D.all_reduce_sum(torch.cat([confusion.double(), loss_sum[None],
                                             top5.double()[None]]))
        confusion = packed[: c * c].round().long().view(c, c).cpu()
        n = max(1, int(confusion.sum()))
        metrics = {
            "val_loss": packed[c * c].item() / n,
            "val_acc": confusion.diag().sum().item() / n,
            "val_samples": n,
        }
        if c > 5:
            metrics["val_top5"] = packed[c * c + 1].item() / n
        if not math.isfinite(metrics["val_loss"]):
            when = f" in epoch {epoch}" if epoch is not None else ""
            raise NonFiniteLossError(f"the validation loss became {metrics['val_loss']}{when}: "
                          f"{self.non_finite_hint}; no model is saved")
        return metrics, confusion


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
