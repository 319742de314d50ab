"""Reading third-party weight files for `tk store import-weights`, without pickle:
``.safetensors`` through safetensors, ``.pth``/``.pt``/``.bin`` through
``torch.load(weights_only=True)`` (which refuses anything but tensors and plain containers).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


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
    """Through :func:`toolkit.model.weights.read_state_dict` (``torch.load(weights_only=True)``,
    wrappers unwrapped), its one-line errors turned into store errors."""
    from toolkit.errors import TkError
    from toolkit.model.weights import PickledObjectError, read_state_dict

    try:
        return read_state_dict(path)
    except PickledObjectError as exc:
        what = f" ({exc.global_name})" if exc.global_name else ""
        raise StoreError(f"refused to import {path}: it holds a pickled Python object{what}, "
                         "not only tensors (tk reads .pth files with "
                         "torch.load(weights_only=True); re-save it as a plain state dict or "
                         ".safetensors)") from None
    except TkError as exc:
        raise StoreError(str(exc)) from None
