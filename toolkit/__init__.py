"""tk: a plugin-based microtoolkit for fine-tuning pretrained image backbones.

The core (this package) knows no concrete model, dataset or loss: everything is a
plugin registered through the hooks in :mod:`toolkit.plugin.hookspecs`.

```python
import toolkit
loaded = toolkit.load_model("demo", store=None)   # .model (eval mode), .classes, .meta
```
"""

from __future__ import annotations

from typing import Any

from toolkit.version import __version__

__all__ = ["__version__", "load_model"]


def load_model(name: str, store: Any = None, **kwargs: Any) -> Any:
    """A stored model rebuilt for inference: see :func:`toolkit.model.loading.load_model`
    (imported on use, so ``import toolkit`` stays cheap)."""
    from toolkit.model.loading import load_model as _load

    return _load(name, store, **kwargs)
