"""The run around the epochs: set-up, resume, the freeze schedule, DDP, checkpoints, best
model and early stopping. Each job has its own part:

- :class:`toolkit.model.freezing.Freezing`: what is frozen when, and its resumable state;
- :class:`toolkit.train.loop.Loop`: one training epoch, one evaluation pass;
- :class:`toolkit.train.progress.Progress`: history, best epoch and weights, early stop;
- :class:`Nets`: the modules an epoch runs (compiled once, DDP-wrapped in one place);
- :class:`Recipes`: the training recipes' state and hooks (EMA, MixUp/CutMix), so the loop
  only sees two callables (the balanced sampler's weights go to the epoch sampler);
- :mod:`toolkit.train.resume`: what a checkpoint holds, and restoring a run from one;
- :mod:`toolkit.train.checkpoint`: storing and reading state faithfully;
- :class:`Trainer`: the order of it all.

Works single-process and under torchrun (DDP); only rank 0 logs, shows progress and
writes files."""

from __future__ import annotations

import json
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
from toolkit.devices import grad_scaler, pin_memory
from toolkit.errors import TkError
from toolkit.model.freezing import Freezing
from toolkit.train import resume as resume_mod
from toolkit.train.checkpoint import save_checkpoint
from toolkit.train.loop import Loop, Schedule, check_batch_norm
from toolkit.train.optim import param_groups
from toolkit.train.progress import Progress


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    backbone_lr_scale: float = 1.0
    warmup_epochs: float = 1.0
    patience: int | None = None  # early stopping: epochs without val-accuracy improvement
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    seed: int = 0
    quiet: bool = False
    task: str = "single-label"  # or "multi-label"
    accumulate: int = 1  # batches per optimizer step
    ema: float | None = None  # EMA decay
    mixup: float = 0.0  # MixUp alpha
    cutmix: float = 0.0  # CutMix alpha
    sample_weights: list[float] | None = None  # per training image (--sampler balanced)

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best epoch."""
        return "val_map" if self.task == "multi-label" else "val_acc"


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, Any]
    best_state: dict[str, torch.Tensor]
    confusion: list[list[int]]
    stopped_early: bool = False
    frozen_groups_end: int = 0
    # multi-label: validation (sigmoid scores [N, C], targets [N, C]) of the best weights
    val_outputs: Any = None


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


class Nets:
    """The modules an epoch runs: ``module`` (the classifier, or the head alone over
    cached features) compiled once; for training wrapped in DDP under torchrun (rewrapped
    around the same compiled module when the trainable set changes); evaluation runs the
    compiled module unwrapped."""

    def __init__(self, module: nn.Module, device: torch.device, dist: D.DistInfo, *,
                 compile: bool, find_unused: bool):
        self.device, self.dist = device, dist
        self.eval: nn.Module = torch.compile(module) if compile else module
        self.train: nn.Module = self.eval
        self.wrap(find_unused)

    def wrap(self, find_unused: bool = True) -> None:
        if self.dist.enabled:
            self.train = D.ddp(self.eval, self.device, find_unused=find_unused)


class Recipes:
    """The recipes' state and hooks: the EMA of the weights (``--ema``: torch's
    ``AveragedModel`` with an EMA function, over params and buffers) and the batch mixer
    (``--mixup`` / ``--cutmix``: torchvision.transforms.v2 on whole batches, soft
    targets)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, num_classes: int):
        self.ema: Any = None
        self.mix: Any = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema),
                                     use_buffers=True)
            self._model = model
        if cfg.mixup or cfg.cutmix:
            from torchvision.transforms import v2

            mixers = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup
                      else []) + ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)]
                                  if cfg.cutmix else [])
            self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self._model)


class Trainer:
    """Trains ``model`` (a toolkit.model.assemble Classifier) under ``freezing``.

    ``optimizer_factory(param_groups, lr, weight_decay) -> Optimizer`` comes from the
    optimizer registry with its options bound. With ``freezing.features_only``
    (frozen-backbone feature cache), ``train_set``/``val_set`` hold precomputed features and
    only the head runs. ``run_identity`` (JSON-able: model, data, classes) goes into every
    checkpoint; a resume whose identity differs is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        freezing: Freezing,
        loss_fn: nn.Module,
        optimizer_factory: Callable[..., torch.optim.Optimizer],
        train_set: torch.utils.data.Dataset,
        val_set: torch.utils.data.Dataset,
        num_classes: int,
        config: TrainConfig,
        device: torch.device,
        *,
        checkpoint: Path | None = None,
        run_identity: dict[str, Any] | None = None,
        dist: D.DistInfo | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.model, self.freezing = model, freezing
        self.optimizer_factory = optimizer_factory
        self.train_set, self.val_set = train_set, val_set
        self.num_classes, self.cfg, self.device = num_classes, config, device
        self.checkpoint = checkpoint
        self.identity = json.loads(json.dumps(run_identity or {}, default=str))
        self.dist = dist or D.DistInfo()
        self.on_epoch_end = on_epoch_end
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.features_only = freezing.features_only
        self._chosen: nn.Module = model  # the weights this epoch may keep as the best
        self.loop = Loop(loss_fn.to(device), num_classes, device, config.precision,
                         config.channels_last and not self.features_only, self.dist,
                         config.epochs, quiet=config.quiet, task=config.task,
                         accumulate=config.accumulate)
        self.recipes: Recipes | None = None

    # -- the run -----------------------------------------------------------------------
    def fit(self, resume: bool = False, saved: dict[str, Any] | None = None) -> TrainResult:
        """Train (continuing from ``saved``, the checkpoint rank 0 read with
        :meth:`read_checkpoint`, when ``resume``); the best epoch's weights and metrics."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.model.to(self.device)
        if self.loop.channels_last:
            self.model.to(memory_format=torch.channels_last)
        train_loader = self._loader(self.train_set, train=True)
        val_loader = self._loader(self.val_set, train=False)
        if len(train_loader) == 0:
            raise TkError("the training set is empty after the split")
        schedule = Schedule.make(cfg.lr, len(train_loader), cfg.epochs, cfg.warmup_epochs,
                                 cfg.accumulate)
        self.recipes = Recipes(cfg, self.model, self.num_classes)
        self.loop.mix = self.recipes.mix
        self.loop.after_step = self.recipes.after_step if self.recipes.ema is not None \
            else None
        opt, scaler, progress = self._start(resume, saved)
        nets = Nets(self._trainable(), self.device, self.dist, compile=cfg.compile,
                    find_unused=bool(self.freezing.unfreeze_at))

        stopped_early = False
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            self._thaw(epoch, opt, nets)
            metrics, confusion = self._epoch(epoch, nets, train_loader, val_loader, opt,
                                             scaler, schedule, first_resumed=resume and
                                             epoch == progress.epoch + 1)
            improved = progress.record(epoch, metrics, confusion, self._chosen)
            self._end_epoch(progress, metrics, improved, opt, scaler)
            if progress.should_stop(cfg.patience, cfg.epochs):
                if self.dist.is_main:
                    what = "val mAP" if cfg.monitor == "val_map" else "val-accuracy"
                    self.log(f"early stopping: no {what} gain for {cfg.patience} epochs")
                stopped_early = True
                break
        assert progress.best_state is not None and progress.best_confusion is not None
        val_outputs = None
        if cfg.task == "multi-label":  # the best weights' scores, for the thresholds
            self.model.load_state_dict(progress.best_state)
            self.loop.evaluate(nets.eval, val_loader)
            val_outputs = self.loop.last_outputs
        return TrainResult(history=progress.history, best_epoch=progress.best_epoch,
                           best_metrics=progress.best_metrics, best_state=progress.best_state,
                           confusion=progress.best_confusion, stopped_early=stopped_early,
                           frozen_groups_end=self.freezing.frozen, val_outputs=val_outputs)

    def _trainable(self) -> nn.Module:
        return self.model.head if self.features_only else self.model

    # -- for the LR range test (toolkit.train.lr_find) -------------------------------------
    def trainable_net(self) -> nn.Module:
        """The module a training step runs (DDP-wrapped under torchrun)."""
        return Nets(self._trainable(), self.device, self.dist, compile=False,
                    find_unused=bool(self.freezing.unfreeze_at)).train

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer over the parameters trainable now."""
        return self._optimizer()

    def train_loader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_set, train=True)

    def _loader(self, dataset: Any, train: bool) -> torch.utils.data.DataLoader:
        # training samples carry their epoch: each one's augmentation is seeded by
        # (seed, epoch, index), whichever worker draws it, so workers can stay alive across
        # epochs and a resumed run still repeats exactly
        seeded = train and not self.features_only
        sampler = D.EpochSampler(len(dataset), seed=self.cfg.seed, shuffle=train,
                                 rank=self.dist.rank, world_size=self.dist.world_size, pad=train,
                                 with_epoch=seeded,
                                 weights=self.cfg.sample_weights if train else None)
        return make_loader(
            SampleSeeded(dataset, self.cfg.seed) if seeded else dataset,
            self.cfg.batch_size,
            shuffle=False,  # the sampler shuffles
            workers=0 if self.features_only else self.cfg.workers,
            seed=self.cfg.seed,
            pin_memory=pin_memory(self.device),
            drop_last=train and len(sampler) > self.cfg.batch_size,
            sampler=sampler,
        )

    def _new_groups(self, only: set[int] | None = None) -> list[dict[str, Any]]:
        return param_groups(self.model, self.cfg.lr, self.cfg.weight_decay,
                            self.cfg.backbone_lr_scale, only=only)

    def _optimizer(self) -> torch.optim.Optimizer:
        groups = self._new_groups()
        if not groups:
            raise TkError("nothing to train: every parameter is frozen")
        opt = self.optimizer_factory(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TkError(f"the optimizer plugin returned {type(opt).__name__}, "
                          "not a torch.optim.Optimizer")
        return opt

    def _thaw(self, epoch: int, opt: torch.optim.Optimizer, nets: Nets) -> None:
        before = self.freezing.frozen
        if self.freezing.thaw(epoch, opt, self._new_groups):
            nets.wrap(find_unused=True)  # the trainable set changed
            if self.dist.is_main:
                self.log(self.freezing.describe_thaw(before))

    def _epoch(self, epoch: int, nets: Nets, train_loader: Any, val_loader: Any,
               opt: torch.optim.Optimizer, scaler: Any, schedule: Schedule,
               first_resumed: bool) -> tuple[dict[str, Any], torch.Tensor]:
        seed_everything(self.cfg.seed * 1000 + epoch)  # augmentation / dropout per epoch
        train_loader.sampler.set_epoch(epoch)
        self.freezing.train_mode(self.model)
        check_batch_norm(self.model, train_loader)
        t0 = time.perf_counter()
        try:
            train_metrics = self.loop.train_epoch(nets.train, train_loader, opt, scaler,
                                                  schedule, epoch)
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
            if not first_resumed:
                raise
            # a checkpoint's optimizer state is only fully checked by using it
            why = " ".join(str(exc).split())[:200]
            raise TkError(f"--resume: the optimizer state in {self.checkpoint} does not fit "
                          f"this run ({why}); start again without --resume") from None
        val_metrics, confusion = self.loop.evaluate(nets.eval, val_loader, epoch)
        self._chosen = self.model
        if self.recipes is not None and self.recipes.ema is not None:
            val_metrics, confusion = self._with_ema(val_metrics, confusion, val_loader, epoch)
        metrics = {"epoch": epoch, **train_metrics, **val_metrics,
                   "epoch_time": time.perf_counter() - t0}
        return metrics, confusion

    def _with_ema(self, raw: dict[str, Any], confusion: torch.Tensor, val_loader: Any,
                  epoch: int) -> tuple[dict[str, Any], torch.Tensor]:
        """Validate the EMA weights too; the epoch's validation metrics (and the weights
        that may become the best) are the better of the two, by the monitored metric.
        Both are recorded: ``raw_val_*``, ``ema_val_*``, ``ema`` (1: the EMA's)."""
        assert self.recipes is not None
        ema_module = self.recipes.ema.module
        ema_metrics, ema_confusion = self.loop.evaluate(
            ema_module.head if self.features_only else ema_module, val_loader, epoch)
        key = self.cfg.monitor
        use_ema = ema_metrics[key] > raw[key]
        chosen = dict(ema_metrics if use_ema else raw)
        chosen.update({"ema": 1.0 if use_ema else 0.0, f"raw_{key}": raw[key],
                       "raw_val_loss": raw["val_loss"], f"ema_{key}": ema_metrics[key],
                       "ema_val_loss": ema_metrics["val_loss"]})
        self._chosen = ema_module if use_ema else self.model
        return chosen, ema_confusion if use_ema else confusion

    def _end_epoch(self, progress: Progress, metrics: dict[str, Any], improved: bool,
                   opt: torch.optim.Optimizer, scaler: Any) -> None:
        if self.dist.is_main:
            self._report(metrics, improved)
            if self.on_epoch_end:
                self.on_epoch_end(metrics["epoch"], metrics)
            if self.checkpoint is not None:
                self._save_checkpoint(progress, opt, scaler)
        D.barrier()

    def _report(self, m: dict[str, Any], improved: bool) -> None:
        if self.cfg.quiet:
            return
        top5 = f" top5 {m['val_top5']:.3f}" if "val_top5" in m else ""
        if "val_map" in m:
            top5 += f" mAP {m['val_map']:.3f} F1 {m['val_f1_micro']:.3f}"
        if "ema" in m:
            top5 += " (EMA)" if m["ema"] else " (raw; EMA " + \
                f"{m['ema_' + self.cfg.monitor]:.3f})"
        self.log(
            f"epoch {m['epoch']}/{self.cfg.epochs}  train loss {m['train_loss']:.4f} "
            f"acc {m['train_acc']:.3f}  val loss {m['val_loss']:.4f} acc {m['val_acc']:.3f}"
            f"{top5}  {m['images_per_s']:.0f} img/s  {m['epoch_time']:.1f}s"
            + ("  *" if improved else "")
        )

    # -- checkpoints -------------------------------------------------------------------
    def _save_checkpoint(self, progress: Progress, opt: torch.optim.Optimizer,
                         scaler: Any) -> None:
        assert self.checkpoint is not None
        save_checkpoint(self.checkpoint, resume_mod.pack(
            identity=self.identity, progress=progress, freezing=self.freezing,
            model=self.model, optimizer=opt, scaler=scaler,
            ema=self.recipes.ema if self.recipes is not None else None))

    def read_checkpoint(self) -> dict[str, Any]:
        """The run's checkpoint (rank 0), its format and identity checked: a resume with
        other data, classes or model is refused here, before anything is trained."""
        return resume_mod.read(self.checkpoint, self.identity)

    def _start(self, resume: bool, saved: dict[str, Any] | None
               ) -> tuple[torch.optim.Optimizer, Any, Progress]:
        """A fresh optimizer, grad scaler and progress; on resume, loaded from ``saved``
        (which rank 0 read and hands to the other ranks: their nodes may not share its
        disk), every part checked before the run continues."""
        self.freezing.freeze_before_training()
        opt = self._optimizer()
        scaler = grad_scaler(self.device, self.cfg.precision)
        if not resume:
            return opt, scaler, Progress(monitor=self.cfg.monitor)
        saved = D.broadcast_object(saved if self.dist.is_main else None)
        assert saved is not None
        progress = resume_mod.restore(
            saved, where=self.checkpoint, model=self.model, freezing=self.freezing,
            optimizer=opt, scaler=scaler, new_groups=self._new_groups,
            epochs=self.cfg.epochs, num_classes=self.num_classes, monitor=self.cfg.monitor,
            ema=self.recipes.ema if self.recipes is not None else None)
        if self.dist.is_main:
            self.log(f"resuming after epoch {progress.epoch} of {self.cfg.epochs} from "
                     f"{self.checkpoint}")
        return opt, scaler, progress
