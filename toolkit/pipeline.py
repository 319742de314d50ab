"""Backbone + head = classifier; freezing by layer groups; optimizer parameter groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.backbone import Backbone
from toolkit.errors import TkError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from toolkit.plugins import Plugins


def _classifier_class() -> type:
    from torch import nn

    class Classifier(nn.Module):
        """images -> backbone features -> head logits. State-dict keys: ``backbone.*``,
        ``head.*`` (the store relies on that prefix to share frozen backbones)."""

        def __init__(self, backbone: nn.Module, head: nn.Module):
            super().__init__()
            self.backbone = backbone
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    return Classifier


_CLASSIFIER: type | None = None


def Classifier(backbone: nn.Module, head: nn.Module) -> nn.Module:  # noqa: N802
    global _CLASSIFIER
    if _CLASSIFIER is None:
        _CLASSIFIER = _classifier_class()
    return _CLASSIFIER(backbone, head)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a classifier's architecture (stored in model metadata)."""

    backbone: str  # qualified name, e.g. "torchvision:alexnet"
    num_classes: int
    head: str = "linear"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    head_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": {"name": self.backbone, "options": self.backbone_options},
            "head": {"name": self.head, "options": self.head_options},
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            backbone=str(d["backbone"]["name"]),
            backbone_options=dict(d["backbone"].get("options") or {}),
            head=str(d["head"]["name"]),
            head_options=dict(d["head"].get("options") or {}),
            num_classes=int(d["num_classes"]),
        )


def call_factory(kind: str, name: str, factory: Any, *args: Any, options: dict[str, Any],
                 **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``, where ``options`` are the user's own options among
    ``kwargs`` (or already bound into ``factory``). A factory that rejects them (TypeError,
    or ValueError / RuntimeError from a bad value such as ``--opt head.dropout=abc``)
    becomes one :class:`TkError` line naming the component and the options; without user
    options such an exception is a plugin bug and propagates."""
    try:
        return factory(*args, **kwargs)
    except TkError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        if not options and not isinstance(exc, TypeError):
            raise
        given = ", ".join(f"{k if str(k).isidentifier() else repr(k)}={v!r}"
                          for k, v in options.items())
        why = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise TkError(f"{kind} '{name}': bad option{'s' if len(options) > 1 else ''}"
                      f"{' ' + given if given else ''} ({why})") from None


def build_backbone(plugins: Plugins, name: str, pretrained: Any, options: dict[str, Any]
                   ) -> Backbone:
    component = plugins.registry("backbones").resolve(name)
    backbone = call_factory("backbone", name, component.factory, pretrained, options=options,
                            **options)
    if not isinstance(backbone, Backbone):
        raise TkError(f"backbone plugin '{component.owner}' returned {type(backbone).__name__}, "
                      "not a toolkit.backbone.Backbone")
    backbone.name = backbone.name or component.qualified_name
    return backbone


def build_head(plugins: Plugins, name: str, num_features: int, num_classes: int,
               options: dict[str, Any]) -> nn.Module:
    component = plugins.registry("heads").resolve(name)
    return call_factory("head", name, component.factory, num_features, num_classes,
                        options=options, **options)


def build_classifier(plugins: Plugins, spec: ModelSpec, pretrained: Any = False
                     ) -> tuple[nn.Module, Backbone]:
    """The classifier for ``spec`` and its backbone (for data config, layer groups...)."""
    backbone = build_backbone(plugins, spec.backbone, pretrained, spec.backbone_options)
    head = build_head(plugins, spec.head, backbone.num_features, spec.num_classes,
                      spec.head_options)
    return Classifier(backbone.module, head), backbone


# -- freezing ---------------------------------------------------------------------------

def frozen_count(freeze: str | int, num_groups: int) -> int:
    """``all`` / ``none`` / ``N`` -> how many leading layer groups are frozen."""
    if isinstance(freeze, str):
        f = freeze.strip().lower()
        if f == "all":
            return num_groups
        if f == "none":
            return 0
        try:
            freeze = int(f)
        except ValueError:
            raise TkError(f"--freeze {freeze}: expected all, none or a number") from None
    if freeze < 0:
        raise TkError(f"--freeze {freeze}: must not be negative")
    if freeze > num_groups:
        raise TkError(f"--freeze {freeze}: this backbone has only {num_groups} layer groups")
    return int(freeze)


def frozen_at_epoch(initial: int, epoch: int, unfreeze_at: int | None) -> int:
    """Gradual unfreezing: from epoch ``unfreeze_at`` on, one more group (from the output
    side) is unfrozen each epoch until none is frozen."""
    if not unfreeze_at or epoch < unfreeze_at:
        return initial
    return max(0, initial - (epoch - unfreeze_at + 1))


def apply_freeze(backbone: Backbone, n_frozen: int) -> None:
    """Freeze the first ``n_frozen`` layer groups (no gradients); unfreeze the rest."""
    for i, group in enumerate(backbone.layer_groups):
        for p in group.parameters():
            p.requires_grad_(i >= n_frozen)


def set_train_mode(model: nn.Module, backbone: Backbone, n_frozen: int) -> None:
    """``model.train()`` except the normalisation layers of frozen groups, which stay in
    eval mode so their running statistics keep their pretrained values."""
    from torch import nn

    model.train()
    for group in backbone.layer_groups[:n_frozen]:
        for m in group.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    if n_frozen == len(backbone.layer_groups):
        backbone.module.eval()  # fully frozen: dropout in the backbone off too


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
