"""The tk model store: trained models and imported pretrained weights as safetensors.

```python
from model_store import ModelStore
store = ModelStore()                # $TK_HOME, else $XDG_DATA_HOME/tk, else ~/.local/share/tk
stored = store.read(name)           # .meta, .tensors (checksum-verified); toolkit.load_model
                                    # rebuilds the module
```

Each tensor is kept once: models refer to tensors in content-addressed blobs (imported
weights, frozen layers) instead of copying them. Nothing here unpickles: models and blobs
are safetensors, ``.pth`` imports go through ``torch.load(weights_only=True)`` in toolkit.

One module, one job::

    store.py          ModelStore, the face: save, read, list, show, rm, verify, gc, owns
    models.py         model files: name, write, read, describe, check
    sharing.py        which tensors of a model stay in its file and which come from blobs
    blobs.py          content-addressed tensor blobs (bases/<sha256>.safetensors)
    weights_cache.py  imported pretrained weights: pointer -> blob + provenance
    fileformat.py     sealed safetensors files (header, digest)
    metadata.py       model metadata: names, validation, format version
    atomic.py         the one atomic writer (temp file, fsync, rename), stale temps, lock
    files.py          opening only regular files; sizes freed; ids for owns()
    records.py        ModelInfo, StoredModel, VerifyResult, Removed
"""

from model_store.metadata import FORMAT_VERSION, check_name
from model_store.records import ModelInfo, Removed, StoredModel, VerifyResult
from model_store.store import ModelStore, default_store_path

__all__ = [
    "FORMAT_VERSION",
    "ModelInfo",
    "ModelStore",
    "Removed",
    "StoredModel",
    "VerifyResult",
    "check_name",
    "default_store_path",
]
