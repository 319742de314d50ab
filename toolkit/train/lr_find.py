"""The LR range test behind ``tk finetune --lr auto`` (Smith 2015; fastai's ``lr_find``).

Before training, the model takes ``steps`` optimizer steps on the training data with a
learning rate growing exponentially from ``start`` to ``end``; the loss (smoothed, averaged
over the ranks under torchrun) is recorded, the test stops early once the loss diverges
(4x its best), and a learning rate is suggested by the "minimum/2" rule: half the learning
rate at which the smoothed loss is lowest, the first tenth of the steps left out (the
smoothed loss of the first few batches is their noise, not the learning rate's effect).

Why not fastai's "valley" (the steep part of the longest falling stretch), which is also
computed and recorded: on the README demo from random initialisation it picked 5.6e-5 for
alexnet and 6.7e-5 for resnet18, where 5 epochs reach 0.73 and about 0.6; half the
minimum picks 1.5e-4 and 8e-4 (0.842 and 0.946; the best fixed values measured were 3e-4
and 2e-3: benchmarks/README.md). The minimum marks where a larger step starts to hurt,
which is what the peak of tk's warm-up + cosine schedule needs (Smith's one-cycle
reasoning); halving it keeps a noisy minimum off the cliff behind it (alexnet at 1.7x its
minimum fell from 0.89 to 0.76).

The minimum is trusted only while the test went over the training data at most
:data:`MAX_PASSES` times (the demo: 2.3-3.2 passes). On a small training set the same
100 steps go over every image many times, the loss keeps falling because the network
memorises, not because the learning rate suits it, and the minimum lands at a learning
rate that then diverges (58 images, 27 passes: lowest loss at 0.066, training at half of it
ended at chance); there the conservative valley is used and the reason recorded. The
model's weights and the random state
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
BURN_IN = 0.1  # the first tenth of the steps: not searched for the minimum
MAX_PASSES = 4.0  # beyond this many passes over the training data, the valley instead
RULE = "minimum/2"


@dataclass
class RangeTest:
    """What the test measured and suggests."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    suggestion: float = 0.0
    rule: str = RULE
    valley: float = 0.0  # fastai's rule, recorded for comparison
    passes: float = 0.0  # how many times the test went over the training data
    why: str = ""  # why the rule is not the default one
    steps: int = 0  # planned
    start: float = START_LR
    end: float = END_LR

    def record(self) -> dict[str, Any]:
        """``meta["training"]["lr_find"]``."""
        return {"suggestion": self.suggestion, "rule": self.rule, "steps": self.steps,
                "steps_run": len(self.lrs), "start": self.start, "end": self.end,
                "min_loss_lr": minimum(self.lrs, self.losses, self.steps) if self.lrs else None,
                "valley": self.valley, "passes": round(self.passes, 3),
                **({"why": self.why} if self.why else {})}


def minimum(lrs: list[float], losses: list[float], steps: int | None = None) -> float:
    """The learning rate of the lowest smoothed loss, the first :data:`BURN_IN` of the
    ``steps`` planned (default: those run) left out while enough points remain."""
    if not lrs:
        return START_LR
    skip = int(BURN_IN * (steps or len(lrs)))
    if len(lrs) - skip < 3:
        skip = 0
    best = min(range(skip, len(lrs)), key=losses.__getitem__)
    return float(lrs[best])


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
    batches = 1
    try:
        model.to(trainer.device)
        trainer.freezing.freeze_before_training()
        net = trainer.trainable_net()
        opt = trainer.new_optimizer()
        ratios = [g["lr"] / trainer.cfg.lr for g in opt.param_groups]
        scaler = grad_scaler(trainer.device, trainer.cfg.precision)
        loader = trainer.train_loader()
        batches = len(loader)
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
    result.passes = len(result.lrs) / max(1, batches)
    choose(result)
    return result


def choose(result: RangeTest) -> None:
    """Set ``result``'s suggestion and rule (see the module's docstring)."""
    result.valley = valley(result.lrs, result.losses)
    if result.passes > MAX_PASSES:
        result.rule = "valley"
        result.why = (f"the test went {result.passes:.1f} times over the training data "
                      f"(more than {MAX_PASSES:g}): its lowest loss is memorising")
        result.suggestion = result.valley
    else:
        result.rule = RULE
        result.suggestion = minimum(result.lrs, result.losses, result.steps) / 2
