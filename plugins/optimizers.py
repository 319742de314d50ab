"""Built-in optimizers: torch's `sgd`, `adam`, `adamw`, and timm's family as `timm-*`."""

from __future__ import annotations

from typing import Any

from toolkit.plugin.hookspecs import hookimpl


def sgd(param_groups: list[dict], lr: float, weight_decay: float, momentum: float = 0.9,
        nesterov: bool = True, dampening: float = 0.0) -> Any:
    import torch

    return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay,
                           momentum=float(momentum), nesterov=bool(nesterov) and momentum > 0,
                           dampening=float(dampening))


def adam(param_groups: list[dict], lr: float, weight_decay: float, beta1: float = 0.9,
         beta2: float = 0.999, eps: float = 1e-8) -> Any:
    import torch

    return torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay,
                            betas=(float(beta1), float(beta2)), eps=float(eps))


def adamw(param_groups: list[dict], lr: float, weight_decay: float, beta1: float = 0.9,
          beta2: float = 0.999, eps: float = 1e-8) -> Any:
    import torch

    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay,
                             betas=(float(beta1), float(beta2)), eps=float(eps))


# timm optimizers worth exposing; each is created through timm's own factory.
TIMM_OPTIMIZERS = ("lamb", "lars", "adabelief", "radam", "nadamw", "lion", "adan", "madgrad",
                   "adafactor", "rmsproptf", "sgdp", "adamp", "laprop", "adopt")


def _timm_factory(opt_name: str) -> Any:
    def factory(param_groups: list[dict], lr: float, weight_decay: float, **options: Any) -> Any:
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(param_groups, opt=opt_name, lr=lr,
                                   weight_decay=weight_decay, **options)

    factory.__name__ = f"timm_{opt_name}"
    return factory


@hookimpl
def tk_register_optimizers(register: Any) -> None:
    register("sgd", sgd, description="SGD (options: momentum=0.9, nesterov=true, dampening)")
    register("adam", adam, default_lr=1e-3, description="Adam (options: beta1, beta2, eps)")
    register("adamw", adamw, default=True, default_lr=1e-3,
             description="AdamW, decoupled weight decay (options: beta1, beta2, eps)")
    for name in TIMM_OPTIMIZERS:
        lr = {"default_lr": 1e-4} if name == "lion" else {}  # Lion wants a 3-10x lower lr
        register(f"timm-{name}", _timm_factory(name), description=f"timm's {name} optimizer",
                 **lr)
