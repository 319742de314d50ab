"""The tk model store: trained models and imported pretrained weights as safetensors.

```python
from model_store import ModelStore
store = ModelStore()                # $TK_HOME, else $XDG_DATA_HOME/tk, else ~/.local/share/tk
stored = store.read(name)           # .meta, .tensors (checksum-verified); toolkit.load_model
                                    # rebuilds the module
```

Nothing here unpickles: models and bases are safetensors, ``.pth`` imports go through
``torch.load(weights_only=True)``. See :mod:`model_store.store` for the layout.
"""

from model_store.metadata import FORMAT_VERSION, check_name
from model_store.store import (
    ModelInfo,
    ModelStore,
    StoredModel,
    VerifyResult,
    default_store_path,
)

__all__ = [
    "FORMAT_VERSION",
    "ModelInfo",
    "ModelStore",
    "StoredModel",
    "VerifyResult",
    "check_name",
    "default_store_path",
]
