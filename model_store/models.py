"""Model files: ``models/<name>.safetensors``, one sealed safetensors file per model.

Its tensors are those only it has; header metadata ``tk`` holds everything inference needs
and ``shared`` (or, format 1, ``base``) names the blob tensors it takes
(:mod:`model_store.sharing`). This module names, writes, reads, describes and checks
them; deciding what is shared and locking are the store's (:mod:`model_store.store`).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store import sharing
from model_store.atomic import atomic_write, is_temp_name
from model_store.blobs import Blobs
from model_store.fileformat import (
    DamagedFileError,
    load_tensors,
    metadata_of,
    read_header,
    read_sealed,
    seal,
    serialize,
    tensor_names,
    verify_sealed,
)
from model_store.files import NotRegularFileError, is_regular, open_regular, sha256_file
from model_store.metadata import (
    META_KEY,
    check_name,
    metrics_summary,
    parse_stored_metadata,
    to_json,
)
from model_store.records import ModelInfo, StoredModel, VerifyResult
from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_MAX_HEADER = 100 * 1024 * 1024


class ModelFiles:
    """The ``models/`` folder of a store whose blobs are ``blobs``."""

    def __init__(self, directory: Path, root: Path, blobs: Blobs):
        self.dir = directory
        self.root = root
        self.blobs = blobs

    def path(self, name: str) -> Path:
        return self.dir / f"{check_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        """Every entry named like a model (temp files left out), whatever it is."""
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot read model store {self.root}: {exc.strerror}") from exc
        names = []
        for e in entries:
            if e.endswith(SUFFIX) and not is_temp_name(e) and not e.startswith("."):
                try:
                    names.append(check_name(e[: -len(SUFFIX)]))
                except StoreError:
                    continue
        return sorted(names)

    def existing(self, name: str) -> Path:
        """The path of model ``name`` (a link or junk counts: it is there), or a one-line
        error with a did-you-mean."""
        path = self.path(name)
        if not os.path.lexists(path):
            names = self.names()
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (
                " (tk store list shows what is there)" if names else " (the store is empty)")
            raise StoreError(f"no model '{name}' in {self.root}{hint}")
        return path

    # -- write / read ----------------------------------------------------------------
    def write(self, name: str, own: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
        """Seal and write the model file atomically; returns its size."""
        chunks, _digest = seal(serialize(own, {META_KEY: to_json(meta)}))
        return atomic_write(self.path(name), chunks, f"model '{name}'")

    def read(self, name: str) -> StoredModel:
        path = self.existing(name)
        try:
            raw, header = read_sealed(path)
        except (DamagedFileError, NotRegularFileError) as exc:
            raise damaged(name, path, exc) from None
        except OSError as exc:
            raise StoreError(f"cannot read model '{name}' ({path}): {exc.strerror}") from exc
        meta = parse_stored_metadata(metadata_of(header), f"model '{name}' ({path})")
        try:
            own = load_tensors(raw)
        except DamagedFileError as exc:
            raise damaged(name, path, exc) from None
        del raw
        tensors = sharing.resolve(meta, own, self.blobs, f"model '{name}'")
        return StoredModel(name=name, path=path, meta=meta, tensors=tensors)

    # -- describe --------------------------------------------------------------------
    def info_from(self, name: str, path: Path, size: int, meta: dict[str, Any]) -> ModelInfo:
        shas = list(dict.fromkeys(sha for sha, _ in sharing.references(meta)))
        return ModelInfo(
            name=name, path=path, size_bytes=size, created=meta["created"],
            backbone=meta["spec"]["backbone"]["name"], classes=list(meta["classes"]),
            metrics=metrics_summary(meta["metrics"]),
            base_ref=shas[0] if shas else None, head=meta["spec"]["head"]["name"],
            base_size_bytes=sum(self.blobs.size(s) for s in shas),
            tk_version=str(meta.get("tk_version", "")),
            shared_bytes=sharing.shared_bytes(meta), blobs=shas,
            format_version=int(meta["format_version"]))

    def info(self, name: str, path: Path | None = None) -> ModelInfo:
        """From the header only (cheap: no checksum)."""
        path = path or self.existing(name)
        try:
            header = read_header(path)
            size = os.stat(path).st_size
        except (DamagedFileError, NotRegularFileError) as exc:
            raise damaged(name, path, exc) from None
        except OSError as exc:
            raise StoreError(f"cannot read model '{name}' ({path}): {exc.strerror}") from exc
        meta = parse_stored_metadata(metadata_of(header), f"model '{name}' ({path})")
        return self.info_from(name, path, size, meta)

    def show(self, name: str) -> dict[str, Any]:
        """The full metadata plus a ``file`` section: path, size, sha256, the blobs it
        takes tensors from (``blobs``: sha256, path, size_bytes, present, tensors,
        used_bytes) and ``shared_bytes``; ``base_path`` etc. name the first blob."""
        path = self.existing(name)
        info = self.info(name, path)
        try:
            meta = parse_stored_metadata(metadata_of(read_header(path)), f"model '{name}'")
            file_sha = sha256_file(path)
        except (DamagedFileError, NotRegularFileError) as exc:
            raise damaged(name, path, exc) from None
        out = dict(meta)
        file: dict[str, Any] = {"path": str(path), "size_bytes": info.size_bytes,
                                "sha256": file_sha, "shared_bytes": info.shared_bytes,
                                "blobs": []}
        if os.path.islink(path):
            file["link_to"] = os.path.realpath(path)
        used = {b["sha256"]: b.get("bytes", 0)
                for b in (meta.get("shared") or {}).get("blobs", [])}
        if meta.get("base"):
            used.setdefault(meta["base"]["sha256"], meta["base"].get("size_bytes", 0))
        for sha, mapping in sharing.references(meta):
            blob = self.blobs.path(sha)
            file["blobs"].append({
                "sha256": sha, "path": str(blob), "size_bytes": self.blobs.size(sha),
                "present": blob.is_file(),
                "tensors": len(self.blobs.keys(sha)) if "*" in mapping else len(mapping),
                "used_bytes": used.get(sha, 0)})
        if file["blobs"]:
            first = file["blobs"][0]
            file.update(base_path=first["path"], base_size_bytes=first["size_bytes"],
                        base_present=first["present"])
        out["file"] = file
        return out

    # -- check -----------------------------------------------------------------------
    def verify(self, name: str, checked: dict[str, str | None]) -> VerifyResult:
        """Digest and metadata of the file, then every blob it names: present, whole
        (``checked`` caches blob outcomes across models), holding the keys it asks for."""
        path = self.dir / f"{name}{SUFFIX}"
        try:
            header = verify_sealed(path)
            meta = parse_stored_metadata(metadata_of(header), "metadata")
        except NotRegularFileError as exc:
            return VerifyResult(name, False, f"{exc.kind}, not a model file", "model", path)
        except (StoreError, OSError) as exc:
            return VerifyResult(name, False, _msg(exc), "model", path)
        own = set(tensor_names(header))
        for sha, mapping in sharing.references(meta):
            if sha not in checked:
                checked[sha] = self.blobs.check_file(sha)
            if checked[sha]:
                return VerifyResult(name, False, checked[sha], "model", path)
            keys = self.blobs.keys(sha)
            missing = [bk for k, bk in mapping.items() if k != "*" and bk not in keys]
            if missing:
                return VerifyResult(name, False, f"blob {sha[:12]} has no tensor "
                                    f"{missing[0]!r}", "model", path)
            prefix = mapping.get("*")
            both = (own & set(mapping) if prefix is None
                    else {k for k in own if k.startswith(prefix) and k[len(prefix):] in keys})
            if both:
                return VerifyResult(name, False, f"tensor {sorted(both)[0]!r} is both in the "
                                    "file and in a blob", "model", path)
        return VerifyResult(name, True, None, "model", path)

    def referenced_blobs(self) -> set[str] | None:
        """Every 64-hex string in every model header (a superset of the blobs they use),
        or None when a header cannot be read (then nothing may be collected). Entries
        that are not regular files refer to nothing."""
        refs: set[str] = set()
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return refs
        except OSError:
            return None
        for entry in entries:
            path = self.dir / entry
            if not entry.endswith(SUFFIX) or is_temp_name(entry) or not is_regular(path):
                continue
            found = _header_hashes(path)
            if found is None:
                return None
            refs |= found
        return refs


def _header_hashes(path: Path) -> set[str] | None:
    """Every 64-hex string in a model file's header, or None when it cannot be read."""
    try:
        with open_regular(path) as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER:
                return None
            text = fh.read(n)
    except (StoreError, OSError):
        return None
    return {m.decode() for m in _HEX64.findall(text)}


def _msg(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())


def damaged(name: str, path: Path, exc: Exception) -> StoreError:
    """The one-line error for a model file that cannot be used."""
    if isinstance(exc, NotRegularFileError):
        return StoreError(f"model '{name}' ({path}) is {exc.kind}, not a model file")
    return StoreError(f"model '{name}' is damaged ({path}): {_msg(exc)}; "
                      "run `tk store verify`")
