"""Training checkpoints without pickle: nested state (dicts, lists, numbers, tensors) split
into safetensors tensors plus a JSON skeleton, sealed with a checksum like the store's
files and written through the store's one atomic writer (temp file, fsync, rename).

What the state means and how it is validated on resume lives with its owners
(:mod:`toolkit.train.progress`, :class:`toolkit.model.freezing.Freezing`); this module only
stores and reads it back faithfully, or says the file is damaged."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from toolkit.errors import StoreError, TkError

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"
SKELETON_KEY = "skeleton"
MAX_DEPTH = 64  # a real checkpoint nests 6 levels deep


def flatten(obj: Any, tensors: dict[str, Any], path: str = "t") -> Any:
    """Replace every tensor in ``obj`` by a reference into ``tensors``."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):
            return {_INTKEYS: {str(k): flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        return {str(k): flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def unflatten(obj: Any, tensors: dict[str, Any], depth: int = 0) -> Any:
    """The inverse of :func:`flatten`; ``ValueError`` for a skeleton that does not fit."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            key = obj[_TENSOR]
            if not isinstance(key, str) or key not in tensors:
                raise ValueError(f"refers to a missing tensor {key!r}")
            return tensors[key]
        if set(obj) == {_TUPLE}:
            if not isinstance(obj[_TUPLE], list):
                raise ValueError("a tuple that is not a list")
            return tuple(unflatten(v, tensors, depth + 1) for v in obj[_TUPLE])
        if set(obj) == {_INTKEYS}:
            inner = obj[_INTKEYS]
            if not isinstance(inner, dict) or not all(k.lstrip("-").isdigit() for k in inner):
                raise ValueError("integer keys that are not integers")
            return {int(k): unflatten(v, tensors, depth + 1) for k, v in inner.items()}
        return {k: unflatten(v, tensors, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors, depth + 1) for v in obj]
    return obj


def save_checkpoint(path: Path, state: dict[str, Any]) -> int:
    """Write ``state`` atomically and sealed; return the bytes written. A failed write is
    one line; the previous checkpoint (if any) is untouched."""
    from model_store.atomic import atomic_write
    from model_store.fileformat import seal, serialize

    tensors: dict[str, Any] = {}
    skeleton = flatten(state, tensors)
    chunks, _digest = seal(serialize(tensors, {SKELETON_KEY: json.dumps(skeleton)}))
    try:
        return atomic_write(path, chunks, "checkpoint")
    except StoreError as exc:
        raise TkError(f"{exc} (the previous checkpoint, if any, is kept)") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote, checksum-verified; a missing, non-regular,
    damaged or edited file is one line."""
    from model_store.fileformat import load_tensors, metadata_of, read_sealed

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TkError(f"no checkpoint at {path}") from None
    except OSError as exc:
        raise TkError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise TkError(f"the checkpoint {path} is not a regular file; start again without "
                      "--resume")
    try:
        raw, header = read_sealed(path)
        skeleton = json.loads(metadata_of(header)[SKELETON_KEY])
        return unflatten(skeleton, load_tensors(raw))
    except OSError as exc:
        raise TkError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except (StoreError, KeyError, ValueError, TypeError, RecursionError) as exc:
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise TkError(f"the checkpoint {path} is damaged ({why}); start again without "
                      "--resume") from None
