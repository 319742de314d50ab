"""The model store's face: save, read, list, show, verify and remove models; garbage
collection; the imported-weights cache through :mod:`model_store.weights_cache`.

Layout of a store directory::

    models/<name>.safetensors      one model: sealed safetensors (see fileformat) with the
                                   tensors only it has; header metadata "tk" = JSON with
                                   everything inference needs, and "shared": which tensors
                                   it takes from which blobs
    bases/<sha256>.safetensors     blobs: tensors kept once, content-addressed (the file's
                                   sha256 is its name), see blobs and sharing
    weights/<plugin>/<name>.json   imported pretrained weights: blob + provenance
    artifacts/<name>/              plots of a model, removed with it
    .lock                          writers hold it (save, import, remove, collect)

A model is written with one atomic rename, after the blob it needs: a save killed at any
point leaves the old state or the complete new model (plus a stale temp file or an
unreferenced blob, both removed by the next writer). Every write ends with a garbage
collection: a blob is removed once no model and no imported-weights pointer names it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store import sharing
from model_store.atomic import clean_stale_temps, fsync_dir, store_lock
from model_store.blobs import Blobs
from model_store.fileformat import check_tensors
from model_store.files import freed_by_unlink, tree_ids
from model_store.metadata import (
    FORMAT_VERSION,
    STORE_KEYS,
    now_iso,
    to_json,
    validate_user_metadata,
)
from model_store.models import ModelFiles
from model_store.records import ModelInfo, Removed, StoredModel, VerifyResult
from model_store.weights_cache import WeightsCache
from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ModelInfo", "ModelStore", "Removed", "StoredModel", "VerifyResult",
           "default_store_path"]


def default_store_path(env: Mapping[str, str] | None = None) -> Path:
    """``$TK_HOME``, else ``$XDG_DATA_HOME/tk``, else ``~/.local/share/tk``."""
    env = os.environ if env is None else env
    if env.get("TK_HOME"):
        return Path(env["TK_HOME"]).expanduser()
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "tk"
    return Path("~/.local/share/tk").expanduser()


class ModelStore:
    """Save, read, list, verify and remove models; import pretrained weights."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.root = Path(path).expanduser() if path else default_store_path()
        self.models_dir = self.root / "models"
        self.bases_dir = self.root / "bases"
        self.weights_dir = self.root / "weights"
        self.blobs = Blobs(self.bases_dir)
        self.models = ModelFiles(self.models_dir, self.root, self.blobs)
        self.weights = WeightsCache(self.weights_dir, self.blobs, self.root)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # -- paths -------------------------------------------------------------------------
    def model_path(self, name: str) -> Path:
        return self.models.path(name)

    def artifact_path(self, name: str, filename: str) -> Path:
        """Where a file that belongs to model ``name`` goes (training curves, confusion
        matrix...): ``artifacts/<name>/<filename>``, removed with the model."""
        if not filename or "/" in filename or filename.startswith("."):
            raise StoreError(f"invalid artifact file name {filename!r}")
        return self.root / "artifacts" / self.models.path(name).stem / filename

    def base_path(self, sha256: str) -> Path:
        """The blob file with sha256 ``sha256``."""
        return self.blobs.path(sha256)

    def weights_path(self, backbone: str) -> Path:
        """The pointer file of the weights imported for ``plugin:name`` (checks the name)."""
        return self.weights.pointer_path(backbone)

    def owns(self, path: str | os.PathLike[str]) -> bool:
        """True when ``path`` is, or would be created, inside the store: compared after
        resolving links, and by (device, inode) of the file and of its folder, so a hard
        link, a bind mount or a link the store holds to an outside file is caught too.
        Commands that write user-named files (``-o``) refuse such paths."""
        p = Path(path).expanduser()
        root = Path(os.path.realpath(self.root))
        real = Path(os.path.realpath(p))
        if real == root or root in real.parents:
            return True
        ids = set()
        for q in (p, p.parent, real.parent):
            try:
                st = os.stat(q)
            except OSError:
                continue
            ids.add((st.st_dev, st.st_ino))
        return bool(ids) and bool(ids & tree_ids(root))

    # -- save --------------------------------------------------------------------------
    def save(self, name: str, state_dict: Mapping[str, torch.Tensor] | nn.Module,
             metadata: dict[str, Any], *, shared: Iterable[str] | None = None,
             shared_prefix: str | None = None, overwrite: bool = False) -> ModelInfo:
        """Write a model atomically. ``metadata`` needs spec, classes, data_config,
        training, metrics and weights (JSON-able).

        ``shared`` names the tensors likely common to other models (frozen layers): keys,
        or prefixes ending in ``"."`` (``shared_prefix="backbone."`` is the same as
        ``shared=["backbone."]``). Whatever the store already holds is referenced, never
        copied: a frozen tensor on imported weights costs nothing, and so does any other
        tensor of 1 KiB or more found in a blob (from blobs the model takes at least 1 MiB
        or half of: see :mod:`model_store.sharing`); shareable tensors found nowhere go
        into a new blob, which the next model on the same weights shares."""
        path = self.model_path(name)
        if not isinstance(metadata, dict):
            raise StoreError("cannot save model: metadata is not a dict")
        metadata = json.loads(to_json(metadata))  # what will be stored: tuples -> lists...
        validate_user_metadata(metadata)
        if os.path.lexists(path) and not overwrite:
            raise StoreError(f"model '{name}' exists; use --overwrite")
        if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
            state_dict = state_dict.state_dict()
        tensors = dict(state_dict)
        check_tensors(tensors)
        shareable = sharing.shareable_keys(tensors, shared, shared_prefix, f"model '{name}'")
        hashes = sharing.hash_candidates(tensors, shareable)

        meta = {k: v for k, v in metadata.items() if k not in STORE_KEYS}
        meta.update(format_version=FORMAT_VERSION, name=name, created=now_iso())
        with store_lock(self.root):
            if os.path.lexists(path) and not overwrite:
                raise StoreError(f"model '{name}' exists; use --overwrite")
            if hashes:
                self.weights.migrate()  # format-1 imports become blobs that can be shared
            plan = sharing.plan(tensors, hashes, shareable, self.blobs)
            shared_meta = sharing.commit(plan, tensors, self.blobs)
            if shared_meta:
                meta["shared"] = shared_meta
            size = self.models.write(name, plan.own, meta)
            self._gc_locked()
        return self.models.info_from(name, path, size, meta)

    # -- read, list, show ------------------------------------------------------------
    def read(self, name: str) -> StoredModel:
        """The model's metadata and tensors (those it takes from blobs merged in under its
        own keys), all checked against their digests; nothing is built."""
        return self.models.read(name)

    def list(self) -> list[ModelInfo]:  # noqa: A003
        """Complete, readable models, newest first. Temp files, damaged files and entries
        that are not regular files are skipped (:meth:`damaged` names them)."""
        infos = []
        for name in self.models.names():
            try:
                infos.append(self.models.info(name, self.models_dir / f"{name}.safetensors"))
            except StoreError:
                continue
        infos.sort(key=lambda i: (i.created, i.name), reverse=True)
        return infos

    def damaged(self) -> list[VerifyResult]:
        """Models that :meth:`list` skips because their header is unreadable (cheap)."""
        out = []
        for name in self.models.names():
            path = self.models_dir / f"{name}.safetensors"
            try:
                self.models.info(name, path)
            except StoreError as exc:
                out.append(VerifyResult(name, False, str(exc), "model", path))
        return out

    def newest(self) -> ModelInfo | None:
        infos = self.list()
        return infos[0] if infos else None

    def info(self, name: str) -> ModelInfo:
        return self.models.info(name)

    def show(self, name: str) -> dict[str, Any]:
        """The full metadata plus a ``file`` section (see :meth:`ModelFiles.show`)."""
        return self.models.show(name)

    def usage(self) -> dict[str, int]:
        """Bytes on disk by part (``models``, ``blobs``, ``weights``, ``other``) and
        ``total``; a file with several links in the store counts once."""
        out = {"models": 0, "blobs": 0, "weights": 0, "other": 0}
        part = {"models": "models", "bases": "blobs", "weights": "weights"}
        seen: set[tuple[int, int]] = set()
        for dirpath, _dirs, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).parts
            key = part.get(rel[0], "other") if rel else "other"
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                out[key] += st.st_size
        out["total"] = sum(out.values())
        return out

    # -- remove / gc -------------------------------------------------------------------
    def remove(self, name: str) -> Removed:
        """Delete a model, its artifacts and every blob nothing else uses. ``freed_bytes``
        counts only what the file system got back: a symlinked model frees nothing of the
        file it points to (which is kept), a hard-linked one nothing while another link
        remains."""
        with store_lock(self.root):
            path = self.models.existing(name)
            kept = None
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                kept = f"the file it links to, {os.path.realpath(path)}, is kept"
            elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                kept = f"{st.st_nlink - 1} other hard link(s) keep its data"
            freed = freed_by_unlink(path)
            try:
                path.unlink()
            except OSError as exc:
                raise StoreError(f"cannot remove model '{name}' ({path}): {exc.strerror}"
                                 ) from exc
            fsync_dir(self.models_dir)
            artifacts = self.root / "artifacts" / name
            if artifacts.is_dir() and not artifacts.is_symlink():
                for dirpath, _dirs, files in os.walk(artifacts):
                    freed += sum(freed_by_unlink(os.path.join(dirpath, f)) for f in files)
                shutil.rmtree(artifacts, ignore_errors=True)
            elif os.path.lexists(artifacts):
                artifacts.unlink(missing_ok=True)
            collected = self._gc_locked()
        return Removed(name, freed + sum(n for _, n in collected), kept, len(collected))

    def gc(self) -> list[Path]:
        """Remove blobs nothing refers to and dead writers' temp files; return the blobs
        removed. (Every save, import and removal does this too.)"""
        with store_lock(self.root):
            return [p for p, _ in self._gc_locked()]

    def _gc_locked(self) -> list[tuple[Path, int]]:
        for directory in (self.models_dir, self.bases_dir, *self.weights.folders()):
            clean_stale_temps(directory)
        referenced = self._referenced()
        if referenced is None:
            return []
        return self.blobs.remove_unreferenced(referenced)

    def _referenced(self) -> set[str] | None:
        """The blobs models and imports may use (a superset), None if unknowable."""
        models = self.models.referenced_blobs()
        weights = self.weights.referenced_blobs()
        return None if models is None or weights is None else models | weights

    # -- verify ------------------------------------------------------------------------
    def verify(self, name: str | None = None) -> list[VerifyResult]:
        """Check digests and references: one model (and the blobs it uses), or every
        model, blob and imported-weights entry in the store."""
        checked: dict[str, str | None] = {}
        if name is not None:
            self.models.existing(name)
            return [self.models.verify(name, checked)]
        results = [self.models.verify(n, checked) for n in self.models.names()]
        for sha in self.blobs.shas():
            if sha not in checked:
                checked[sha] = self.blobs.check_file(sha)
            results.append(VerifyResult(f"blob:{sha[:12]}", checked[sha] is None,
                                        checked[sha], "blob", self.blobs.path(sha)))
        results.extend(self.weights.verify(checked))
        return results

    # -- imported pretrained weights ---------------------------------------------------
    def import_weights(self, backbone: str, tensors: Mapping[str, torch.Tensor],
                       provenance: dict[str, Any],
                       source_metadata: Mapping[str, str] | None = None) -> Path:
        """Keep pretrained weights for the backbone ``plugin:name`` (the caller reads the
        file: see :func:`toolkit.model.weights.import_weights`); ``provenance`` (source
        file, its sha256, tk version...) goes into the pointer. Returns the path of the
        blob holding the tensors (what :meth:`find_weights` returns). Models on weights
        imported before keep them: their blob stays while they refer to it."""
        self.weights.pointer_path(backbone)  # check the name before anything else
        if not tensors:
            raise StoreError(f"no tensors to import for '{backbone}'")
        check_tensors(dict(tensors))
        with store_lock(self.root):
            path = self.weights.put(backbone, tensors, provenance, source_metadata)
            self._gc_locked()
        return path

    def find_weights(self, backbone: str) -> Path | None:
        """The imported weights of ``plugin:name`` (or of a bare name imported under
        exactly one plugin) as a plain safetensors file a backbone factory can read
        (``pretrained=PATH``), or None."""
        return self.weights.find(backbone)

    def load_weights(self, backbone: str) -> dict[str, torch.Tensor]:
        """The checksum-verified tensors imported for ``backbone`` (StoreError if none)."""
        return self.weights.load(backbone)

    def weights_info(self, backbone: str) -> dict[str, Any] | None:
        """Provenance of imported weights (source file, its sha256, when) plus ``path``
        and ``sha256`` of the file with the tensors; None if not imported."""
        return self.weights.info(backbone)

    def list_weights(self) -> list[dict[str, Any]]:
        """Imported weights: backbone, path, size_bytes, blob, pointer, source_name,
        imported."""
        return self.weights.entries()
