"""``lion``: the Lion optimizer (Chen et al., 2023, "Symbolic Discovery of Optimization
Algorithms"), written from the paper's update rule:

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

Every step moves each weight by exactly ``lr``, so use a learning rate 3-10x smaller than
for AdamW. Per-group ``lr`` and ``weight_decay`` (tk's discriminative learning rates, no
decay on norms and biases) are honoured like in any torch optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from toolkit.errors import TkError


class Lion(torch.optim.Optimizer):
    def __init__(self, params: Any, lr: float = 1e-4, beta1: float = 0.9, beta2: float = 0.99,
                 weight_decay: float = 0.0):
        for label, value in (("lr", lr), ("weight_decay", weight_decay)):
            if value < 0:
                raise TkError(f"optimizer 'lion': {label} must be >= 0, got {value}")
        for label, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise TkError(f"optimizer 'lion': {label} must be in [0, 1), got {value}")
        super().__init__(params, {"lr": lr, "beta1": beta1, "beta2": beta2,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["beta1"], group["beta2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if wd:
                    p.mul_(1.0 - lr * wd)
                update = m.mul(beta1).add_(p.grad, alpha=1.0 - beta1).sign_()
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1.0 - beta2)
        return loss


def lion(param_groups: list[dict[str, Any]], lr: float, weight_decay: float,
         beta1: float = 0.9, beta2: float = 0.99) -> Lion:
    return Lion(param_groups, lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                weight_decay=float(weight_decay))
