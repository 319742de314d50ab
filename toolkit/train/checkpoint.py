"""Training checkpoints without pickle: nested state (dicts, lists, numbers, tensors) split
into safetensors tensors plus a JSON skeleton, written atomically."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from toolkit.errors import TkError

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """Replace every tensor in ``obj`` by a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{path}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
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


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(unflatten(v, tensors) for v in obj[_TUPLE])
        if set(obj) == {_INTKEYS}:
            return {int(k): unflatten(v, tensors) for k, v in obj[_INTKEYS].items()}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (temp file, fsync, rename)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one writer per run folder: a temp file already here is a killed writer's
        for stale in path.parent.glob(".ckpt-*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise TkError(f"cannot write checkpoint {path}: {_os_reason(exc)}") from None
    os.close(fd)
    try:
        # safetensors refuses tensors sharing memory; clone those that do
        seen: dict[int, str] = {}
        for k, t in list(tensors.items()):
            ptr = t.data_ptr() if t.numel() else -1
            if ptr in seen:
                tensors[k] = t.clone()
            elif ptr != -1:
                seen[ptr] = k
        save_file(tensors, tmp, metadata={"skeleton": json.dumps(skeleton)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) or _is_write_failure(exc):
            raise TkError(f"cannot write checkpoint {path}: {_os_reason(exc)} (the previous "
                          "checkpoint, if any, is kept)") from None
        raise


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on device"
        if exc.errno == errno.EFBIG:
            return "file too large (file-size limit reached)"
        return exc.strerror or str(exc)
    code = re.search(r"\(os error (\d+)\)", str(exc))  # safetensors' wrapped OS error
    if code:
        number = int(code.group(1))
        return _os_reason(OSError(number, os.strerror(number)))
    return " ".join(str(exc).split())


def _is_write_failure(exc: BaseException) -> bool:
    """safetensors reports a failed write as its own error type wrapping the OS error."""
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and (
        "No space left" in text or "File too large" in text or "os error" in text)


def load_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        return unflatten(json.loads(meta["skeleton"]), tensors)
    except FileNotFoundError:
        raise TkError(f"no checkpoint at {path} to resume from") from None
    except Exception as exc:
        raise TkError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}); "
                      "start again without --resume") from None
