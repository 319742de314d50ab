"""Rebuild a stored model: the store hands back tensors and metadata, this module builds the
architecture through the plugin registry and loads the tensors into it.

```python
import toolkit
loaded = toolkit.load_model("demo")    # .model (eval mode), .classes, .meta, .spec, .data_config
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store import ModelStore
from toolkit.errors import StoreError, TkError
from toolkit.model.assemble import ModelSpec, build_classifier
from toolkit.model.backbone import DataConfig
from toolkit.plugin.provenance import rebuild_hint

if TYPE_CHECKING:
    import torch
    from torch import nn

    from toolkit.plugin.manager import Plugins


@dataclass
class LoadedModel:
    """A stored model ready for inference."""

    model: nn.Module  # images -> logits, eval mode
    classes: list[str]
    meta: dict[str, Any]
    spec: ModelSpec
    data_config: DataConfig
    name: str = ""
    path: Path | None = None


def open_store(store: ModelStore | str | os.PathLike[str] | None) -> ModelStore:
    """``store`` as a :class:`ModelStore` (None: the default location)."""
    return store if isinstance(store, ModelStore) else ModelStore(store)


def load_model(name: str, store: ModelStore | str | os.PathLike[str] | None = None, *,
               plugins: Plugins | None = None, device: str | torch.device = "cpu"
               ) -> LoadedModel:
    """Model ``name`` from ``store`` (a :class:`~model_store.ModelStore`, a directory, or
    None for the default store), rebuilt through the plugins' registries (``plugins``:
    the loaded plugins, else the installed ones), its weights checksum-verified, in eval
    mode on ``device``."""
    stored = open_store(store).read(name)
    meta, tensors = stored.meta, stored.tensors
    spec = ModelSpec.from_dict(meta["spec"])
    data_config = DataConfig.from_dict(meta["data_config"])
    if plugins is None:
        from toolkit.plugin.manager import load_plugins

        plugins = load_plugins()
    _check_fit_on_meta(plugins, spec, tensors, name)
    try:
        model, _backbone = build_classifier(plugins, spec, pretrained=False)
    except TkError as exc:
        hint = rebuild_hint(meta)
        raise StoreError(f"cannot rebuild model '{name}': {exc}"
                         + (f"; {hint}" if hint else "")) from exc
    _load_strict(model, tensors, name, spec)
    try:
        model = model.to(device)
    except (RuntimeError, ValueError) as exc:
        raise TkError(f"cannot move model '{name}' to device {device!r}: "
                      f"{' '.join(str(exc).split())}") from exc
    model.eval()
    return LoadedModel(model=model, classes=list(meta["classes"]), meta=meta, spec=spec,
                       data_config=data_config, name=name, path=stored.path)


def _check_fit_on_meta(plugins: Plugins, spec: ModelSpec, tensors: dict[str, torch.Tensor],
                       name: str) -> None:
    """Build the architecture on torch's meta device (shapes only: no memory, no
    initialisation) and check that the file's tensors fit it, before the real build
    allocates anything: a hand-edited spec (say a backbone width of 20000) is refused here
    instead of exhausting memory. A factory that cannot run on the meta device is left to
    the real build and its own checks."""
    import torch

    try:
        with torch.device("meta"):
            shapes, _ = build_classifier(plugins, spec, pretrained=False)
    except Exception:  # noqa: BLE001 - any failure here is reported by the real build
        return
    _check_fit(shapes.state_dict(), tensors, name, spec)


def _check_fit(expected: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor],
               name: str, spec: ModelSpec) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape)
             != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise StoreError(f"model '{name}' does not fit its architecture "
                         f"({spec.backbone} + {spec.head}): {'; '.join(parts)}")


def _load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], name: str,
                 spec: ModelSpec) -> None:
    _check_fit(model.state_dict(), tensors, name, spec)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise StoreError(f"model '{name}': cannot load its weights: "
                         f"{' '.join(str(exc).split())[:300]}") from exc
