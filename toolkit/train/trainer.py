"""The training loop: epochs, mixed precision, freezing schedule, LR schedule, validation,
early stopping, best-epoch tracking and resumable checkpoints. Works single-process and
under torchrun (DDP); only rank 0 logs, shows progress and writes files."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit import distributed as D
from toolkit.data.loader import make_loader
from toolkit.devices import autocast, grad_scaler, pin_memory, to_device
from toolkit.errors import TkError
from toolkit.model.backbone import Backbone
from toolkit.model.freezing import apply_freeze, frozen_at_epoch, set_train_mode
from toolkit.train.checkpoint import load_checkpoint, save_checkpoint
from toolkit.train.optim import param_groups

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    frozen_groups: int = 0  # leading backbone layer groups frozen at the start
    unfreeze_at: int | None = None
    backbone_lr_scale: float = 1.0
    warmup_epochs: float = 1.0
    patience: int | None = None  # early stopping: epochs without val-accuracy improvement
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    seed: int = 0
    grad_clip: float | None = None
    quiet: bool = False


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_metrics: dict[str, float]
    best_state: dict[str, torch.Tensor]
    confusion: list[list[int]]
    stopped_early: bool = False
    frozen_groups_end: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


class SampleSeeded(torch.utils.data.Dataset):
    """Items keyed ``(index, epoch)``: ``dataset[index]`` with every random number its
    transform draws seeded by (seed, epoch, index). In the main process the global RNG
    state is restored afterwards, so dropout and the rest of training are unaffected."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        sample_seed = ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63
        if torch.utils.data.get_worker_info() is None:
            with torch.random.fork_rng(devices=[]):
                state = random.getstate()
                seed_everything(sample_seed)
                try:
                    return self.dataset[index]
                finally:
                    random.setstate(state)
        seed_everything(sample_seed)
        return self.dataset[index]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 1% of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains ``model`` (a toolkit.model.assemble Classifier over ``backbone``).

    ``optimizer_factory(param_groups, lr, weight_decay) -> Optimizer`` comes from the
    optimizer registry with its options bound. When ``features`` is given (frozen-backbone
    feature cache), ``train_set``/``val_set`` hold precomputed features and only the head
    runs.
    """

    def __init__(
        self,
        model: nn.Module,
        backbone: Backbone,
        loss_fn: nn.Module,
        optimizer_factory: Callable[..., torch.optim.Optimizer],
        train_set: torch.utils.data.Dataset,
        val_set: torch.utils.data.Dataset,
        num_classes: int,
        config: TrainConfig,
        device: torch.device,
        run_dir: Path | None = None,
        dist: D.DistInfo | None = None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        head_only: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        self.model, self.backbone, self.loss_fn = model, backbone, loss_fn.to(device)
        self.optimizer_factory = optimizer_factory
        self.train_set, self.val_set = train_set, val_set
        self.num_classes, self.cfg, self.device = num_classes, config, device
        self.run_dir = run_dir
        self.dist = dist or D.DistInfo()
        self.on_epoch_end = on_epoch_end
        self.head_only = head_only
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.n_groups = len(backbone.layer_groups)

    # -- set-up ------------------------------------------------------------------------
    def _loader(self, dataset: Any, train: bool) -> torch.utils.data.DataLoader:
        workers = 0 if self.head_only else self.cfg.workers
        # training samples carry their epoch: each one's augmentation is seeded by
        # (seed, epoch, index), whichever worker draws it, so workers can stay alive across
        # epochs and a resumed run still repeats exactly
        seeded = train and not self.head_only
        sampler = D.EpochSampler(len(dataset), seed=self.cfg.seed, shuffle=train,
                                 rank=self.dist.rank, world_size=self.dist.world_size, pad=train,
                                 with_epoch=seeded)
        return make_loader(
            SampleSeeded(dataset, self.cfg.seed) if seeded else dataset,
            self.cfg.batch_size,
            shuffle=False,  # the sampler shuffles
            workers=workers,
            seed=self.cfg.seed,
            pin_memory=pin_memory(self.device),
            drop_last=train and len(sampler) > self.cfg.batch_size,
            sampler=sampler,
        )

    def _trainable(self) -> nn.Module:
        return self.model.head if self.head_only else self.model

    def _frozen(self, epoch: int) -> int:
        if self.head_only:
            return self.n_groups
        return frozen_at_epoch(self.cfg.frozen_groups, epoch, self.cfg.unfreeze_at)

    def _build_optimizer(self, n_frozen: int) -> torch.optim.Optimizer:
        apply_freeze(self.backbone, n_frozen)
        groups = param_groups(self.model, self.cfg.lr, self.cfg.weight_decay,
                              self.cfg.backbone_lr_scale)
        if not groups:
            raise TkError("nothing to train: every parameter is frozen")
        opt = self.optimizer_factory(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TkError(f"the optimizer plugin returned {type(opt).__name__}, "
                          "not a torch.optim.Optimizer")
        return opt

    def _unfreeze(self, opt: torch.optim.Optimizer, n_from: int, n_to: int) -> None:
        """Unfreeze groups ``n_to..n_from-1`` and add their parameters to the optimizer."""
        before = {id(p) for g in opt.param_groups for p in g["params"]}
        apply_freeze(self.backbone, n_to)
        new = {id(p) for p in self.model.parameters() if p.requires_grad} - before
        for group in param_groups(self.model, self.cfg.lr, self.cfg.weight_decay,
                                  self.cfg.backbone_lr_scale, only=new):
            opt.add_param_group(group)
        if self.dist.is_main and n_to != n_from:
            self.log(f"unfroze backbone layer groups {n_to + 1}..{n_from} "
                     f"({n_to} of {self.n_groups} still frozen)")

    # -- one epoch ---------------------------------------------------------------------
    def _set_lr(self, opt: torch.optim.Optimizer, step: int, total: int, warmup: int) -> float:
        f = lr_factor(step, total, warmup)
        for g in opt.param_groups:
            g["lr"] = g.get("initial_lr", g["lr"]) * f
        return self.cfg.lr * f

    def _train_epoch(self, net: nn.Module, loader: Any, opt: torch.optim.Optimizer,
                     scaler: Any, epoch: int, step0: int, total: int, warmup: int
                     ) -> tuple[dict[str, float], int]:
        from tqdm import tqdm

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        lr = self.cfg.lr
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg.epochs}", unit="batch",
                   file=sys.stderr, leave=False, dynamic_ncols=True,
                   disable=self.cfg.quiet or not self.dist.is_main)
        step = step0
        for i, (x, y) in enumerate(bar):
            lr = self._set_lr(opt, step, total, warmup)
            x = to_device(x, self.device, self.cfg.channels_last and not self.head_only)
            y = to_device(y, self.device)
            with autocast(self.device, self.cfg.precision):
                logits = net(x)
            loss = self.loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if self.cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            n = y.shape[0]
            seen += n
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            if i % 16 == 15 or i + 1 == len(loader):  # one device sync per 16 steps
                if not torch.isfinite(loss_sum):
                    raise TkError(f"the loss became {loss_sum.item()} in epoch {epoch} (by step "
                                  f"{i + 1}): lower --lr, or use --precision 32")
            if i % 10 == 0 and bar.n is not None and not bar.disable:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen * self.dist.world_size / max(elapsed, 1e-9):.0f}")
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
        }, step

    @torch.inference_mode()
    def evaluate(self, net: nn.Module, loader: Any) -> tuple[dict[str, float], torch.Tensor]:
        """Loss, top-1 (and top-5 with more than 5 classes) and the confusion matrix over the
        whole validation set (summed across ranks; every sample counted once)."""
        net.eval()
        c = self.num_classes
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        top5 = torch.zeros((), dtype=torch.int64, device=self.device)
        confusion = torch.zeros(c * c, dtype=torch.int64, device=self.device)
        for x, y in loader:
            x = to_device(x, self.device, self.cfg.channels_last and not self.head_only)
            y = to_device(y, self.device)
            with autocast(self.device, self.cfg.precision):
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
            "val_samples": float(n),
        }
        if c > 5:
            metrics["val_top5"] = packed[c * c + 1].item() / n
        return metrics, confusion

    # -- the run -----------------------------------------------------------------------
    def _checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir else None

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.model.to(self.device)
        if cfg.channels_last and not self.head_only:
            self.model.to(memory_format=torch.channels_last)
        train_loader = self._loader(self.train_set, train=True)
        val_loader = self._loader(self.val_set, train=False)
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise TkError("the training set is empty after the split")
        total = steps_per_epoch * cfg.epochs
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch)) if cfg.epochs > 1 else 0

        state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": 0, "best_acc": -1.0,
                                 "best_state": None, "best_confusion": None, "since_best": 0}
        ckpt = self._checkpoint_path()
        n_frozen = self._frozen(1)
        start = 1
        if resume:
            # rank 0 wrote the checkpoint; it reads it and hands it to the other ranks (their
            # nodes may not share its disk)
            saved = None
            if self.dist.is_main:
                if ckpt is None or not ckpt.exists():
                    raise TkError(f"--resume: no checkpoint in {self.run_dir}")
                saved = load_checkpoint(ckpt)
            saved = D.broadcast_object(saved)
            state = saved["state"]
            start = int(state["epoch"]) + 1
            n_frozen = self._frozen(1)  # replay the freeze schedule up to the saved epoch
        opt = self._build_optimizer(n_frozen)
        for e in range(2, start):
            n_next = self._frozen(e)
            if n_next < n_frozen:
                self._unfreeze(opt, n_frozen, n_next)
                n_frozen = n_next
        if resume:
            try:
                self.model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                why = " ".join(str(exc).split())[:200]
                raise TkError(f"--resume: the checkpoint in {self.run_dir} was made with other "
                              "settings (backbone, head, classes, freezing or optimizer); resume "
                              f"with the original command ({why})") from None
            if self.dist.is_main:
                self.log(f"resuming after epoch {start - 1} of {cfg.epochs} from {ckpt}")
        scaler = grad_scaler(self.device, cfg.precision)
        if resume and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])

        net: nn.Module = self._trainable()
        if cfg.compile:
            net = torch.compile(net)
        eval_net = net  # evaluation runs on the unwrapped module
        if self.dist.enabled:
            ddp_kwargs: dict[str, Any] = {}
            if self.device.type == "cuda":
                ddp_kwargs["device_ids"] = [self.device.index]
            # gradual unfreezing changes the trainable set between epochs
            ddp_kwargs["find_unused_parameters"] = bool(cfg.unfreeze_at)
            ddp = nn.parallel.DistributedDataParallel(net, **ddp_kwargs)
            net = ddp

        stopped_early = False
        for epoch in range(start, cfg.epochs + 1):
            n_next = self._frozen(epoch)
            if n_next < n_frozen:
                self._unfreeze(opt, n_frozen, n_next)
                n_frozen = n_next
                if self.dist.enabled:  # the trainable set changed: rewrap
                    net = nn.parallel.DistributedDataParallel(
                        self._trainable(), find_unused_parameters=True,
                        **({"device_ids": [self.device.index]}
                           if self.device.type == "cuda" else {}))
            seed_everything(cfg.seed * 1000 + epoch)  # augmentation / dropout per epoch
            train_loader.sampler.set_epoch(epoch)
            if self.head_only:
                net.train()
            else:
                set_train_mode(self.model, self.backbone, n_frozen)
            t0 = time.perf_counter()
            train_metrics, _ = self._train_epoch(net, train_loader, opt, scaler, epoch,
                                                 (epoch - 1) * steps_per_epoch, total, warmup)
            val_metrics, confusion = self.evaluate(eval_net, val_loader)
            metrics = {"epoch": float(epoch), **train_metrics, **val_metrics,
                       "epoch_time": time.perf_counter() - t0}
            state["history"].append(metrics)
            improved = metrics["val_acc"] > state["best_acc"]
            if improved:
                state.update(best_epoch=epoch, best_acc=metrics["val_acc"], since_best=0,
                             best_state={k: v.detach().to("cpu", copy=True)
                                         for k, v in self.model.state_dict().items()},
                             best_confusion=confusion.tolist())
            else:
                state["since_best"] += 1
            state["epoch"] = epoch
            if self.dist.is_main:
                self._report(metrics, improved)
                if self.on_epoch_end:
                    self.on_epoch_end(epoch, metrics)
                if ckpt is not None:
                    save_checkpoint(ckpt, {
                        "state": state,
                        "model": self.model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    })
            D.barrier()
            if cfg.patience and state["since_best"] >= cfg.patience and epoch < cfg.epochs:
                if self.dist.is_main:
                    self.log(f"early stopping: no val-accuracy gain for {cfg.patience} epochs")
                stopped_early = True
                break

        best_metrics = state["history"][state["best_epoch"] - 1]
        return TrainResult(
            history=state["history"],
            best_epoch=state["best_epoch"],
            best_metrics=best_metrics,
            best_state=state["best_state"],
            confusion=state["best_confusion"],
            stopped_early=stopped_early,
            frozen_groups_end=n_frozen,
        )

    def _report(self, m: dict[str, float], improved: bool) -> None:
        if self.cfg.quiet:
            return
        top5 = f" top5 {m['val_top5']:.3f}" if "val_top5" in m else ""
        self.log(
            f"epoch {int(m['epoch'])}/{self.cfg.epochs}  train loss {m['train_loss']:.4f} "
            f"acc {m['train_acc']:.3f}  val loss {m['val_loss']:.4f} acc {m['val_acc']:.3f}"
            f"{top5}  {m['images_per_s']:.0f} img/s  {m['epoch_time']:.1f}s"
            + ("  *" if improved else "")
        )

