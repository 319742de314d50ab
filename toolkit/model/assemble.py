"""Backbone + head = classifier; freezing by layer groups; optimizer parameter groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError
from toolkit.model.backbone import Backbone

if TYPE_CHECKING:
    import torch
    from torch import nn

    from toolkit.plugin.manager import Plugins


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
    options any exception is the plugin's bug and propagates (the CLI names the plugin:
    :mod:`toolkit.plugin.blame`)."""
    try:
        return factory(*args, **kwargs)
    except TkError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        if not options:
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
                      "not a toolkit.model.backbone.Backbone")
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
