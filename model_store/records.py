"""What the store hands back: plain records, no behaviour."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class ModelInfo:
    """One stored model as `tk store list` shows it."""

    name: str
    path: Path
    size_bytes: int  # the model file alone
    created: str  # UTC ISO 8601
    backbone: str
    classes: list[str]
    metrics: dict[str, float]  # the scalar metrics
    base_ref: str | None  # sha256 of the first shared blob it uses, if any
    head: str = ""
    base_size_bytes: int = 0  # on-disk size of the blob files it uses (shared with others)
    tk_version: str = ""
    shared_bytes: int = 0  # bytes of the tensors it takes from shared blobs
    blobs: list[str] = field(default_factory=list)  # sha256 of every blob it uses
    format_version: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass
class VerifyResult:
    """Outcome of checking one file: ``ok`` or the ``problem`` in one line."""

    name: str
    ok: bool
    problem: str | None = None
    kind: str = "model"  # "model", "blob" or "weights"
    path: Path | None = None


@dataclass
class StoredModel:
    """A stored model as the store holds it: checksum-verified tensors (its shared blob
    tensors merged in under the model's own keys) and metadata. Rebuilding the
    ``nn.Module`` is toolkit's job (:func:`toolkit.load_model`)."""

    name: str
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass
class Removed:
    """What `tk store rm` did: the bytes really given back to the file system (a symlinked
    or hard-linked model file frees nothing), and what was kept, if anything."""

    name: str
    freed_bytes: int
    kept: str | None = None  # e.g. "the link's target /x/m.safetensors"
    blobs_removed: int = 0
