"""Imported pretrained weights: a small pointer per backbone, the tensors in one blob.

``weights/<plugin>/<name>.json`` names the blob (``bases/<sha256>.safetensors``, keys as in
the imported file) and keeps the provenance (source file, its sha256, when, tk version,
the source's own safetensors metadata). The blob is what a backbone factory gets as
``pretrained=PATH``. Reimporting writes a new blob and moves the pointer; the old blob
stays as long as a model refers to it (garbage collection asks every model).

Format-1 stores kept a sealed copy ``weights/<plugin>/<name>.safetensors`` instead; it is
still found and read, and turned into a blob + pointer when the store next needs it
(:meth:`WeightsCache.migrate`, under the store lock).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.atomic import atomic_write, is_temp_name
from model_store.blobs import Blobs, tensor_hash
from model_store.fileformat import (
    DamagedFileError,
    load_tensors,
    metadata_of,
    read_header,
    read_sealed,
    verify_sealed,
)
from model_store.files import NotRegularFileError, read_regular, sha256_file
from model_store.metadata import FORMAT_VERSION, META_KEY, check_name, now_iso
from model_store.records import VerifyResult
from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch

POINTER = ".json"
V1_SUFFIX = ".safetensors"
V1_META_KEY = "tk_weights"  # format 1: the provenance JSON in the sealed file's header
_RESERVED = (META_KEY, V1_META_KEY, "tk_digest", "tk_blob")
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_MAX_POINTER = 1 << 20


def split_qualified(backbone: str) -> tuple[str, str]:
    if not isinstance(backbone, str) or backbone.count(":") != 1:
        raise StoreError(f"weights need a qualified backbone name 'plugin:name', "
                         f"not {backbone!r}")
    owner, name = backbone.split(":")
    return check_name(owner, "plugin name"), check_name(name, "backbone name")


class WeightsCache:
    """The ``weights/`` folder of a store, its blobs in :class:`~model_store.blobs.Blobs`."""

    def __init__(self, directory: Path, blobs: Blobs, root: Path):
        self.dir = directory
        self.blobs = blobs
        self.root = root

    def pointer_path(self, backbone: str) -> Path:
        owner, name = split_qualified(backbone)
        return self.dir / owner / f"{name}{POINTER}"

    def v1_path(self, backbone: str) -> Path:
        owner, name = split_qualified(backbone)
        return self.dir / owner / f"{name}{V1_SUFFIX}"

    # -- writing (store lock held) -----------------------------------------------------
    def put(self, backbone: str, tensors: Mapping[str, torch.Tensor],
            provenance: Mapping[str, Any], source_metadata: Mapping[str, str] | None = None,
            imported: str | None = None) -> Path:
        """Keep ``tensors`` as the weights of ``backbone``; returns the blob's path."""
        pointer = self.pointer_path(backbone)
        if not tensors:
            raise StoreError(f"no tensors to import for '{backbone}'")
        tensors = dict(tensors)
        hashes = {k: tensor_hash(t) for k, t in tensors.items()}
        sha, size, _ = self.blobs.write(tensors, hashes, f"weights for '{backbone}'")
        record = {
            "format_version": FORMAT_VERSION, "backbone": backbone, "blob": sha,
            "size_bytes": size, "tensors": len(tensors), "imported": imported or now_iso(),
            "provenance": dict(provenance),
            "source_metadata": {k: v for k, v in (source_metadata or {}).items()
                                if k not in _RESERVED},
        }
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        atomic_write(pointer, [text.encode()], f"weights for '{backbone}'")
        old = self.v1_path(backbone)
        if os.path.lexists(old):  # superseded by the pointer
            old.unlink()
        return self.blobs.path(sha)

    def migrate(self) -> list[str]:
        """Turn every readable format-1 weights file into blob + pointer (store lock
        held); damaged ones stay for `tk store verify` to name. Returns the backbones."""
        done = []
        for backbone, path in self._v1_files():
            if self.pointer_path(backbone).exists():
                continue
            try:
                raw, header = read_sealed(path)
                tensors = load_tensors(raw)
                del raw
                meta = metadata_of(header)
                info = json.loads(meta.get(V1_META_KEY, "{}"))
            except (StoreError, OSError, ValueError):
                continue
            if not isinstance(info, dict):
                continue
            provenance = {k: v for k, v in info.items()
                          if k not in ("format_version", "backbone", "imported")}
            self.put(backbone, tensors, provenance, meta, imported=info.get("imported"))
            done.append(backbone)
        return done

    # -- reading -----------------------------------------------------------------------
    def _pointers(self) -> list[tuple[str, Path]]:
        return self._entries(POINTER)

    def _v1_files(self) -> list[tuple[str, Path]]:
        return self._entries(V1_SUFFIX)

    def _entries(self, suffix: str) -> list[tuple[str, Path]]:
        out = []
        try:
            owners = sorted(os.listdir(self.dir))
        except OSError:
            return out
        for owner in owners:
            try:
                names = sorted(os.listdir(self.dir / owner))
            except OSError:
                continue
            for entry in names:
                stem = entry[: -len(suffix)]
                if (entry.endswith(suffix) and not is_temp_name(entry)
                        and not entry.startswith(".")):
                    try:
                        backbone = f"{check_name(owner)}:{check_name(stem)}"
                    except StoreError:
                        continue
                    out.append((backbone, self.dir / owner / entry))
        return out

    def read_pointer(self, path: Path, backbone: str) -> dict[str, Any]:
        try:
            if os.stat(path).st_size > _MAX_POINTER:
                raise StoreError(f"imported weights pointer {path} is too large")
            record = json.loads(read_regular(path).decode("utf-8"))
        except NotRegularFileError as exc:
            raise StoreError(f"imported weights for '{backbone}': {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot read imported weights pointer {path}: {exc.strerror}"
                             ) from exc
        except (UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"imported weights pointer {path} is damaged ({exc}); import "
                             "the weights again") from None
        if not (isinstance(record, dict) and isinstance(record.get("blob"), str)
                and re.fullmatch(r"[0-9a-f]{64}", record["blob"])
                and isinstance(record.get("provenance", {}), dict)):
            raise StoreError(f"imported weights pointer {path} is damaged (bad fields); "
                             "import the weights again")
        return record

    def _locate(self, backbone: str) -> tuple[str, Path, dict[str, Any] | None] | None:
        """(qualified name, file the weights are in, pointer record or None for format 1)."""
        if ":" in backbone:
            candidates = [backbone]
        else:
            check_name(backbone, "backbone name")
            candidates = sorted({b for b, _ in (*self._pointers(), *self._v1_files())
                                 if b.split(":")[1] == backbone})
            if len(candidates) != 1:
                return None
        qualified = candidates[0]
        pointer = self.pointer_path(qualified)
        if os.path.lexists(pointer):
            record = self.read_pointer(pointer, qualified)
            return qualified, self.blobs.path(record["blob"]), record
        old = self.v1_path(qualified)
        if os.path.lexists(old):
            return qualified, old, None
        return None

    def find(self, backbone: str) -> Path | None:
        """The file holding the imported weights of ``plugin:name`` (or of a bare name
        imported under exactly one plugin): a plain safetensors file with the source's
        keys, or None. A pointer whose blob is gone is an error, not a silent None."""
        found = self._locate(backbone)
        if found is None:
            return None
        qualified, path, record = found
        if record is not None and not os.path.lexists(path):
            raise StoreError(f"imported weights for '{qualified}' are missing their tensors "
                             f"({path}); run `tk store import-weights {qualified} FILE` again")
        return path

    def load(self, backbone: str) -> dict[str, torch.Tensor]:
        """The checksum-verified tensors imported for ``backbone`` (StoreError if none)."""
        found = self._locate(backbone)
        if found is None:
            raise StoreError(f"no weights for '{backbone}' in {self.root} (import them with "
                             f"`tk store import-weights {backbone} FILE`)")
        qualified, path, record = found
        if record is not None:
            try:
                return self.blobs.load(record["blob"], f"imported weights for '{qualified}'")
            except StoreError as exc:
                raise StoreError(f"{exc}; import them again") from None
        try:
            raw, _header = read_sealed(path)
            return load_tensors(raw)
        except (DamagedFileError, NotRegularFileError) as exc:
            raise StoreError(f"imported weights {path} are damaged: {exc}; import them again"
                             ) from None

    def info(self, backbone: str) -> dict[str, Any] | None:
        """Provenance (source file, its sha256, when imported, tk version) plus ``path``
        and ``sha256`` of the file with the tensors, ``pointer`` (None for format 1);
        None if not imported."""
        found = self._locate(backbone)
        if found is None:
            return None
        qualified, path, record = found
        if record is not None:
            info = dict(record.get("provenance") or {})
            info.update({k: v for k, v in record.items() if k != "provenance"},
                        path=str(path), sha256=record["blob"],
                        pointer=str(self.pointer_path(qualified)))
            return info
        try:
            meta = metadata_of(read_header(path))
            info = json.loads(meta.get(V1_META_KEY, "{}"))
        except (StoreError, OSError, ValueError) as exc:
            raise StoreError(f"imported weights {path} are damaged: {exc}") from None
        if not isinstance(info, dict):
            raise StoreError(f"imported weights {path} have bad metadata")
        info.update(path=str(path), sha256=sha256_file(path), pointer=None)
        return info

    def entries(self) -> list[dict[str, Any]]:
        """Every import: backbone, path (the tensors), size_bytes, blob (None: format 1),
        pointer, source_name, imported."""
        out = []
        for backbone, pointer in self._pointers():
            try:
                record = self.read_pointer(pointer, backbone)
            except StoreError:
                continue
            prov = record.get("provenance") or {}
            out.append({"backbone": backbone, "path": str(self.blobs.path(record["blob"])),
                        "size_bytes": self.blobs.size(record["blob"]),
                        "blob": record["blob"], "pointer": str(pointer),
                        "source_name": prov.get("source_name"),
                        "imported": record.get("imported")})
        pointed = {e["backbone"] for e in out}
        for backbone, path in self._v1_files():
            if backbone in pointed:
                continue
            try:
                size = os.stat(path).st_size
            except OSError:
                continue
            out.append({"backbone": backbone, "path": str(path), "size_bytes": size,
                        "blob": None, "pointer": None, "source_name": None,
                        "imported": None})
        return sorted(out, key=lambda e: e["backbone"])

    def referenced_blobs(self) -> set[str] | None:
        """Every 64-hex string in every pointer (a superset of the blobs they name), or
        None when a pointer cannot be read (then nothing may be collected)."""
        refs: set[str] = set()
        for _backbone, pointer in self._pointers():
            try:
                if not os.path.isfile(pointer):  # a FIFO or other junk points at nothing
                    continue
                text = read_regular(pointer)[:_MAX_POINTER]
            except (StoreError, OSError):
                return None
            refs |= {m.decode() for m in _HEX64.findall(text)}
        return refs

    def verify(self, checked: dict[str, str | None]) -> list[VerifyResult]:
        """Pointers (their blob present and whole; ``checked`` caches blob outcomes) and
        format-1 files (their checksum)."""
        results = []
        for backbone, pointer in self._pointers():
            label = f"weights:{backbone}"
            try:
                record = self.read_pointer(pointer, backbone)
            except StoreError as exc:
                results.append(VerifyResult(label, False, str(exc), "weights", pointer))
                continue
            sha = record["blob"]
            if sha not in checked:
                checked[sha] = self.blobs.check_file(sha)
            problem = checked[sha]
            results.append(VerifyResult(label, problem is None, problem, "weights", pointer))
        for backbone, path in self._v1_files():
            label = f"weights:{backbone}"
            try:
                verify_sealed(path)
                results.append(VerifyResult(label, True, None, "weights", path))
            except (StoreError, OSError) as exc:
                results.append(VerifyResult(label, False, _msg(exc), "weights", path))
        return results

    def folders(self) -> list[Path]:
        try:
            return [self.dir / o for o in sorted(os.listdir(self.dir))
                    if (self.dir / o).is_dir()]
        except OSError:
            return []


def _msg(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())
