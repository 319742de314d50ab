"""The LR range test behind ``tk finetune --lr auto`` (Smith 2015; fastai's ``lr_find``).

Before training, the model takes ``steps`` optimizer steps on the training data with a
learning rate growing exponentially from ``start`` to ``end``; the loss (smoothed, averaged
over the ranks under torchrun) is recorded, the test stops early once the loss diverges
(4x its best), and a learning rate is suggested with fastai's "valley" rule: the middle of
the longest stretch where the loss keeps falling. The model's weights and the random state
are restored afterwards, so training starts exactly as it would have; the optimizer used
by the test is thrown away. Works with every freeze mode (the same trainable parameters and
per-group LR ratios as training) and with the feature cache (the head alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolkit.train.trainer import Trainer

START_LR, END_LR = 1e-7, 10.0
DEFAULT_STEPS = 100
SMOOTH = 0.98  # exponential smoothing of the loss, debiased
DIVERGE = 4.0  # stop once the smoothed loss exceeds this multiple of its best


@dataclass
class RangeTest:
    """What the test measured and suggests."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    suggestion: float = 0.0
    rule: str = "valley"
    steps: int = 0  # planned
    start: float = START_LR
    end: float = END_LR

    def record(self) -> dict[str, Any]:
        """``meta["training"]["lr_find"]``."""
        best = min(range(len(self.losses)), key=self.losses.__getitem__) if self.losses else 0
        return {"suggestion": self.suggestion, "rule": self.rule, "steps": self.steps,
                "steps_run": len(self.lrs), "start": self.start, "end": self.end,
                "min_loss_lr": self.lrs[best] if self.lrs else None}


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's "valley": the LR two thirds of the way down the longest decreasing run
    (longest decreasing subsequence) of the loss curve."""
    n = len(losses)
    if n < 3:
        return lrs[0] if lrs else START_LR
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[min(max(idx, 0), n - 1)])


def range_test(trainer: Trainer, steps: int = DEFAULT_STEPS, start: float = START_LR,
               end: float = END_LR) -> RangeTest:
    """Run the test on ``trainer``'s model and training data; everything restored after."""
    import torch

    from toolkit import distributed as D
    from toolkit.devices import autocast, grad_scaler, to_device

    model = trainer.model
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    frozen = trainer.freezing.frozen
    result = RangeTest(steps=int(steps), start=start, end=end)
    try:
        model.to(trainer.device)
        trainer.freezing.freeze_before_training()
        net = trainer.trainable_net()
        opt = trainer.new_optimizer()
        ratios = [g["lr"] / trainer.cfg.lr for g in opt.param_groups]
        scaler = grad_scaler(trainer.device, trainer.cfg.precision)
        loader = trainer.train_loader()
        trainer.freezing.train_mode(model)
        channels_last = trainer.loop.channels_last
        avg, best, step, epoch = 0.0, math.inf, 0, 0
        while step < steps and len(loader):
            loader.sampler.set_epoch(epoch)
            epoch += 1
            for x, y in loader:
                if step >= steps:
                    break
                lr = start * (end / start) ** (step / max(1, steps - 1))
                for g, r in zip(opt.param_groups, ratios, strict=True):
                    g["lr"] = lr * r
                x, y = to_device(x, trainer.device, channels_last), to_device(y, trainer.device)
                with autocast(trainer.device, trainer.cfg.precision):
                    logits = net(x)
                loss = trainer.loop.loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                value = D.all_reduce_sum(loss.detach().double().reshape(1)).item() / max(
                    1, trainer.dist.world_size)
                step += 1
                if not math.isfinite(value):
                    break
                avg = SMOOTH * avg + (1 - SMOOTH) * value
                smoothed = avg / (1 - SMOOTH ** step)
                result.lrs.append(lr)
                result.losses.append(smoothed)
                best = min(best, smoothed)
                if step > 10 and smoothed > DIVERGE * best:
                    break
            else:
                continue
            break
    finally:
        model.load_state_dict(saved)
        torch.random.set_rng_state(rng)
        trainer.freezing.frozen = frozen
        for p in model.parameters():
            p.grad = None
    # the last few points of a diverging run only pull the valley towards the cliff
    result.suggestion = valley(result.lrs, result.losses)
    return result
