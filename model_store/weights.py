"""Reading third-party weight files for `tk store import-weights`, without pickle:
``.safetensors`` through safetensors, ``.pth``/``.pt``/``.bin`` through
``torch.load(weights_only=True)`` (which refuses anything but tensors and plain containers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


def _tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_weight_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata of the source or {}) from a weight file."""
    if not path.is_file():
        raise StoreError(f"weight file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pth(path), {}
    raise StoreError(f"cannot import {path.name}: expected a .safetensors or .pth file")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise StoreError(f"cannot read {path}: not a valid safetensors file ({msg})") from exc
    if not tensors:
        raise StoreError(f"{path} holds no tensors")
    return tensors, meta


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global ([\w.]+)", text)
        if found:
            raise StoreError(
                f"refused to import {path}: it holds a pickled Python object "
                f"({found.group(1)}), not only tensors (tk reads .pth files with "
                "torch.load(weights_only=True); re-save it as a plain state dict or "
                ".safetensors)") from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        why = " ".join((detail.group(1) if detail else text).split())[:200]
        raise StoreError(f"cannot read {path}: not a weight file that "
                         f"torch.load(weights_only=True) accepts ({why})") from exc
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise StoreError(f"cannot read {path}: not a readable torch weight file ({msg})"
                         ) from exc
    if _tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if _tensor_dict(obj.get(key)):
                return dict(obj[key])
    raise StoreError(f"{path} holds no state dict (expected a dict of tensor names to tensors, "
                     f"found {type(obj).__name__})")
