"""Optimizer parameter groups: head / backbone x decay / no-decay."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn



def _no_decay(name: str, p: Any) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_scale: float,
    only: set[int] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups: head / backbone x decay / no-decay (norms and biases get no weight
    decay; backbone parameters get ``lr * backbone_lr_scale``). Only trainable parameters;
    ``only`` restricts to parameters whose ``id`` is in the set (used when unfreezing)."""
    buckets: dict[tuple[str, bool], list[Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (only is not None and id(p) not in only):
            continue
        part = "backbone" if name.startswith("backbone.") else "head"
        buckets.setdefault((part, _no_decay(name, p)), []).append(p)
    groups = []
    for (part, no_decay), params in sorted(buckets.items(), key=lambda kv: kv[0]):
        group_lr = lr * (backbone_lr_scale if part == "backbone" else 1.0)
        groups.append({
            "params": params,
            "lr": group_lr,
            "initial_lr": group_lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{part}{'-no-decay' if no_decay else ''}",
        })
    return groups
