"""The model store: trained models and imported weights as safetensors files.

Layout of a store directory::

    models/<name>.safetensors      one model: sealed safetensors (see fileformat), header
                                   metadata "tk" = JSON with everything inference needs
    bases/<sha256>.safetensors     shared frozen weights (e.g. a backbone), content-addressed:
                                   the file's sha256 is its name; models refer to it
    weights/<plugin>/<name>.safetensors   pretrained weights imported for offline finetuning
    .lock                          writers hold it (save, remove, garbage collection)

A model file is written with one atomic rename, after its base: a save killed at any point
leaves either the old state or the complete new model (plus a stale temp file, ignored by
readers and removed by the next writer).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.atomic import (
    atomic_write,
    clean_stale_temps,
    fsync_dir,
    is_temp_name,
    store_lock,
)
from model_store.fileformat import (
    DamagedFileError,
    load_tensors,
    metadata_of,
    read_header,
    read_sealed,
    seal,
    serialize,
    sha256_file,
    verify_sealed,
)
from model_store.metadata import (
    FORMAT_VERSION,
    META_KEY,
    STORE_KEYS,
    check_name,
    metrics_summary,
    now_iso,
    parse_stored_metadata,
    to_json,
    validate_user_metadata,
)
from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch
    from torch import nn

SUFFIX = ".safetensors"
WEIGHTS_META_KEY = "tk_weights"
_HEX64 = re.compile(rb"[0-9a-f]{64}")


def default_store_path(env: Mapping[str, str] | None = None) -> Path:
    """``$TK_HOME``, else ``$XDG_DATA_HOME/tk``, else ``~/.local/share/tk``."""
    env = os.environ if env is None else env
    if env.get("TK_HOME"):
        return Path(env["TK_HOME"]).expanduser()
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "tk"
    return Path("~/.local/share/tk").expanduser()


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
    base_ref: str | None  # sha256 of the shared base, if any
    head: str = ""
    base_size_bytes: int = 0  # size of the shared base file (0 without one)
    tk_version: str = ""

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
    kind: str = "model"  # "model", "base" or "weights"
    path: Path | None = None


@dataclass
class StoredModel:
    """A stored model as the store holds it: checksum-verified tensors (its shared base
    merged in) and metadata. Rebuilding the ``nn.Module`` is toolkit's job
    (:func:`toolkit.load_model`)."""

    name: str
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class ModelStore:
    """Save, load, list, verify and remove models; import pretrained weights."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.root = Path(path).expanduser() if path else default_store_path()
        self.models_dir = self.root / "models"
        self.bases_dir = self.root / "bases"
        self.weights_dir = self.root / "weights"

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # -- paths -------------------------------------------------------------------------
    def model_path(self, name: str) -> Path:
        return self.models_dir / f"{check_name(name)}{SUFFIX}"

    def artifact_path(self, name: str, filename: str) -> Path:
        """Where a file that belongs to model ``name`` goes (training curves, confusion
        matrix...): ``artifacts/<name>/<filename>``, removed with the model."""
        if not filename or "/" in filename or filename.startswith("."):
            raise StoreError(f"invalid artifact file name {filename!r}")
        return self.root / "artifacts" / check_name(name) / filename

    def base_path(self, sha256: str) -> Path:
        return self.bases_dir / f"{sha256}{SUFFIX}"

    def weights_path(self, backbone: str) -> Path:
        owner, name = _split_qualified(backbone)
        return self.weights_dir / owner / f"{name}{SUFFIX}"

    def _names(self) -> list[str]:
        try:
            entries = os.listdir(self.models_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot read model store {self.root}: {exc.strerror}") from exc
        return sorted(e[: -len(SUFFIX)] for e in entries
                      if e.endswith(SUFFIX) and not is_temp_name(e) and not e.startswith("."))

    def _existing(self, name: str) -> Path:
        path = self.model_path(name)
        if not path.is_file():
            names = self._names()
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (
                " (tk store list shows what is there)" if names else " (the store is empty)")
            raise StoreError(f"no model '{name}' in {self.root}{hint}")
        return path

    # -- save --------------------------------------------------------------------------
    def save(self, name: str, state_dict: Mapping[str, torch.Tensor] | nn.Module,
             metadata: dict[str, Any], *, shared_prefix: str | None = None,
             overwrite: bool = False) -> ModelInfo:
        """Write a model atomically. ``metadata`` needs spec, classes, data_config, training,
        metrics and weights (JSON-able). With ``shared_prefix`` (e.g. ``"backbone."``) the
        tensors under that prefix go once into a content-addressed base shared by every
        model built on the same weights."""
        path = self.model_path(name)
        if not isinstance(metadata, dict):
            raise StoreError("cannot save model: metadata is not a dict")
        metadata = json.loads(to_json(metadata))  # what will be stored: tuples -> lists...
        validate_user_metadata(metadata)
        if path.exists() and not overwrite:
            raise StoreError(f"model '{name}' exists; use --overwrite")
        if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
            state_dict = state_dict.state_dict()
        tensors = dict(state_dict)

        base_raw: bytes | None = None
        base_meta: dict[str, Any] | None = None
        if shared_prefix:
            shared = {k[len(shared_prefix):]: v for k, v in tensors.items()
                      if k.startswith(shared_prefix)}
            if not shared:
                raise StoreError(f"cannot save model '{name}': no tensor name starts with "
                                 f"{shared_prefix!r}")
            tensors = {k: v for k, v in tensors.items() if not k.startswith(shared_prefix)}
            base_raw = serialize(shared)
            base_meta = {"sha256": hashlib.sha256(base_raw).hexdigest(),
                         "prefix": shared_prefix, "size_bytes": len(base_raw),
                         "tensors": len(shared)}

        meta = {k: v for k, v in metadata.items() if k not in STORE_KEYS}
        meta.update(format_version=FORMAT_VERSION, name=name, created=now_iso(),
                    base=base_meta)
        chunks, _digest = seal(serialize(tensors, {META_KEY: to_json(meta)}))

        with store_lock(self.root):
            replaced = path.exists()
            if replaced and not overwrite:
                raise StoreError(f"model '{name}' exists; use --overwrite")
            for directory in (self.models_dir, self.bases_dir):
                clean_stale_temps(directory)
            if base_meta is not None and base_raw is not None:
                base_file = self.base_path(base_meta["sha256"])
                if not (base_file.is_file() and sha256_file(base_file) == base_meta["sha256"]):
                    atomic_write(base_file, [base_raw], "shared base weights")
            size = atomic_write(path, chunks, f"model '{name}'")
            if replaced:
                self._gc_locked()
        return ModelInfo(
            name=name, path=path, size_bytes=size, created=meta["created"],
            backbone=meta["spec"]["backbone"]["name"], classes=list(meta["classes"]),
            metrics=metrics_summary(meta["metrics"]),
            base_ref=base_meta["sha256"] if base_meta else None,
            head=meta["spec"]["head"]["name"],
            base_size_bytes=base_meta["size_bytes"] if base_meta else 0,
            tk_version=str(meta.get("tk_version", "")))

    # -- load --------------------------------------------------------------------------
    def read(self, name: str) -> StoredModel:
        """The model's metadata and tensors (its base merged in under the base's prefix),
        both checksum-verified; nothing is built."""
        path = self._existing(name)
        try:
            raw, header = read_sealed(path)
        except DamagedFileError as exc:
            raise _damaged(name, path, exc) from None
        except OSError as exc:
            raise StoreError(f"cannot read model '{name}' ({path}): {exc.strerror}") from exc
        meta = parse_stored_metadata(metadata_of(header), f"model '{name}' ({path})")
        try:
            tensors = load_tensors(raw)
        except DamagedFileError as exc:
            raise _damaged(name, path, exc) from None
        del raw
        base = meta.get("base")
        if base:
            prefix = base["prefix"]
            shared = self._load_base(base["sha256"], name)
            clash = [k for k in shared if prefix + k in tensors]
            if clash:
                raise StoreError(f"model '{name}': tensor {prefix + clash[0]!r} is both in the "
                                 "model file and in its base")
            tensors.update({prefix + k: v for k, v in shared.items()})
        return StoredModel(name=name, path=path, meta=meta, tensors=tensors)

    def _load_base(self, sha: str, name: str) -> dict[str, torch.Tensor]:
        path = self.base_path(sha)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise StoreError(f"model '{name}': its base weights {sha[:12]} are missing "
                             f"({path})") from None
        except OSError as exc:
            raise StoreError(f"model '{name}': cannot read base {path}: {exc.strerror}"
                             ) from exc
        if hashlib.sha256(raw).hexdigest() != sha:
            raise StoreError(f"model '{name}': its base weights {sha[:12]} are damaged "
                             f"({path}: sha256 mismatch); run `tk store verify`")
        try:
            return load_tensors(raw)
        except DamagedFileError as exc:
            raise StoreError(f"model '{name}': base {path} is unreadable: {exc}") from None

    # -- list / info / show ------------------------------------------------------------
    def _info(self, name: str, path: Path) -> ModelInfo:
        """From the header only (cheap: no checksum)."""
        try:
            header = read_header(path)
            size = path.stat().st_size
        except DamagedFileError as exc:
            raise _damaged(name, path, exc) from None
        except OSError as exc:
            raise StoreError(f"cannot read model '{name}' ({path}): {exc.strerror}") from exc
        meta = parse_stored_metadata(metadata_of(header), f"model '{name}' ({path})")
        base = meta.get("base") or None
        base_size = 0
        if base:
            try:
                base_size = self.base_path(base["sha256"]).stat().st_size
            except OSError:
                base_size = 0
        return ModelInfo(
            name=name, path=path, size_bytes=size, created=meta["created"],
            backbone=meta["spec"]["backbone"]["name"], classes=list(meta["classes"]),
            metrics=metrics_summary(meta["metrics"]),
            base_ref=base["sha256"] if base else None, head=meta["spec"]["head"]["name"],
            base_size_bytes=base_size, tk_version=str(meta.get("tk_version", "")))

    def list(self) -> list[ModelInfo]:  # noqa: A003
        """Complete, readable models, newest first. Temp files and damaged files are
        skipped (:meth:`damaged` names the latter)."""
        infos = []
        for name in self._names():
            try:
                infos.append(self._info(name, self.models_dir / f"{name}{SUFFIX}"))
            except StoreError:
                continue
        infos.sort(key=lambda i: (i.created, i.name), reverse=True)
        return infos

    def damaged(self) -> list[VerifyResult]:
        """Models that :meth:`list` skips because their header is unreadable (cheap)."""
        out = []
        for name in self._names():
            path = self.models_dir / f"{name}{SUFFIX}"
            try:
                self._info(name, path)
            except StoreError as exc:
                out.append(VerifyResult(name, False, str(exc), "model", path))
        return out

    def newest(self) -> ModelInfo | None:
        infos = self.list()
        return infos[0] if infos else None

    def info(self, name: str) -> ModelInfo:
        return self._info(name, self._existing(name))

    def show(self, name: str) -> dict[str, Any]:
        """The full metadata plus a ``file`` section (path, size, sha256, base file)."""
        path = self._existing(name)
        info = self._info(name, path)
        try:
            meta = parse_stored_metadata(metadata_of(read_header(path)), f"model '{name}'")
            file_sha = sha256_file(path)
        except DamagedFileError as exc:
            raise _damaged(name, path, exc) from None
        out = dict(meta)
        out["file"] = {"path": str(path), "size_bytes": info.size_bytes, "sha256": file_sha}
        if info.base_ref:
            base_path = self.base_path(info.base_ref)
            out["file"]["base_path"] = str(base_path)
            out["file"]["base_size_bytes"] = info.base_size_bytes
            out["file"]["base_present"] = base_path.is_file()
        return out

    # -- remove / gc -------------------------------------------------------------------
    def remove(self, name: str) -> int:
        """Delete a model and every base no other model uses; return the bytes freed."""
        with store_lock(self.root):
            path = self._existing(name)
            freed = path.stat().st_size
            try:
                path.unlink()
            except OSError as exc:
                raise StoreError(f"cannot remove model '{name}' ({path}): {exc.strerror}"
                                 ) from exc
            fsync_dir(self.models_dir)
            shutil.rmtree(self.root / "artifacts" / name, ignore_errors=True)
            for base in self._gc_locked():
                freed += base[1]
        return freed

    def gc(self) -> list[Path]:
        """Remove unreferenced bases and stale temp files; return the bases removed."""
        with store_lock(self.root):
            return [p for p, _ in self._gc_locked()]

    def _gc_locked(self) -> list[tuple[Path, int]]:
        for directory in (self.models_dir, self.bases_dir):
            clean_stale_temps(directory)
        try:
            bases = [e for e in os.listdir(self.bases_dir)
                     if e.endswith(SUFFIX) and not e.startswith(".")]
        except OSError:
            return []
        referenced: set[str] = set()
        for name in self._names():
            refs = _referenced_hashes(self.models_dir / f"{name}{SUFFIX}")
            if refs is None:  # a header we cannot read might reference any base: keep all
                return []
            referenced |= refs
        removed = []
        for entry in bases:
            sha = entry[: -len(SUFFIX)]
            if sha in referenced:
                continue
            path = self.bases_dir / entry
            try:
                size = path.stat().st_size
                path.unlink()
                removed.append((path, size))
            except OSError:
                continue
        if removed:
            fsync_dir(self.bases_dir)
        return removed

    # -- verify ------------------------------------------------------------------------
    def verify(self, name: str | None = None) -> list[VerifyResult]:
        """Check checksums: one model (and its base), or everything in the store."""
        if name is not None:
            return [self._verify_model(name, self._existing(name))]
        results = [self._verify_model(n, self.models_dir / f"{n}{SUFFIX}")
                   for n in self._names()]
        for path in _files(self.bases_dir):
            sha = path.name[: -len(SUFFIX)]
            try:
                ok = sha256_file(path) == sha
                problem = None if ok else "sha256 mismatch: the file changed after it was written"
            except OSError as exc:
                ok, problem = False, f"unreadable: {exc.strerror}"
            results.append(VerifyResult(f"base:{sha[:12]}", ok, problem, "base", path))
        for path in sorted(self.weights_dir.glob(f"*/*{SUFFIX}")):
            if is_temp_name(path.name):
                continue
            label = f"weights:{path.parent.name}:{path.name[: -len(SUFFIX)]}"
            try:
                verify_sealed(path)
                results.append(VerifyResult(label, True, None, "weights", path))
            except (DamagedFileError, OSError) as exc:
                results.append(VerifyResult(label, False, _msg(exc), "weights", path))
        return results

    def _verify_model(self, name: str, path: Path) -> VerifyResult:
        try:
            header = verify_sealed(path)
            meta = parse_stored_metadata(metadata_of(header), "metadata")
        except (StoreError, OSError) as exc:
            return VerifyResult(name, False, _msg(exc), "model", path)
        base = meta.get("base")
        if base:
            base_path = self.base_path(base["sha256"])
            if not base_path.is_file():
                return VerifyResult(name, False, f"base {base['sha256'][:12]} missing "
                                    f"({base_path})", "model", path)
            try:
                if sha256_file(base_path) != base["sha256"]:
                    return VerifyResult(name, False, f"base {base['sha256'][:12]} damaged "
                                        f"({base_path}: sha256 mismatch)", "model", path)
            except OSError as exc:
                return VerifyResult(name, False, f"base unreadable: {exc.strerror}",
                                    "model", path)
        return VerifyResult(name, True, None, "model", path)

    # -- imported pretrained weights ---------------------------------------------------
    def import_weights(self, backbone: str, tensors: Mapping[str, torch.Tensor],
                       provenance: dict[str, Any],
                       source_metadata: Mapping[str, str] | None = None) -> Path:
        """Store pretrained weights for the backbone ``plugin:name`` (the caller reads the
        file: see :func:`toolkit.model.weights.import_weights`); ``provenance`` (source
        file, its sha256, tk version...) is kept in the file's header. Returns the path."""
        target = self.weights_path(backbone)
        if not tensors:
            raise StoreError(f"no tensors to import for '{backbone}'")
        info = {**provenance, "format_version": FORMAT_VERSION, "backbone": backbone,
                "imported": now_iso()}
        file_meta = {k: v for k, v in (source_metadata or {}).items()
                     if k not in (META_KEY, WEIGHTS_META_KEY, "tk_digest")}
        file_meta[WEIGHTS_META_KEY] = json.dumps(info, sort_keys=True)
        chunks, _ = seal(serialize(dict(tensors), file_meta))
        with store_lock(self.root):
            clean_stale_temps(target.parent)
            atomic_write(target, chunks, f"weights for '{backbone}'")
        return target

    def find_weights(self, backbone: str) -> Path | None:
        """The imported weight file for ``plugin:name`` (or a bare name imported under
        exactly one plugin), or None."""
        if ":" in backbone:
            path = self.weights_path(backbone)
            return path if path.is_file() else None
        check_name(backbone, "backbone name")
        found = [p for p in self.weights_dir.glob(f"*/{backbone}{SUFFIX}") if p.is_file()]
        return found[0] if len(found) == 1 else None

    def load_weights(self, backbone: str) -> dict[str, torch.Tensor]:
        """The checksum-verified tensors imported for ``backbone`` (StoreError if none)."""
        path = self.find_weights(backbone)
        if path is None:
            raise StoreError(f"no weights for '{backbone}' in {self.root} (import them with "
                             f"`tk store import-weights {backbone} FILE`)")
        try:
            raw, _header = read_sealed(path)
            return load_tensors(raw)
        except DamagedFileError as exc:
            raise StoreError(f"imported weights {path} are damaged: {exc}; import them again"
                             ) from None

    def weights_info(self, backbone: str) -> dict[str, Any] | None:
        """Provenance of imported weights (source file, its sha256, when) plus
        ``path`` and ``sha256`` of the stored file; None if not imported."""
        path = self.find_weights(backbone)
        if path is None:
            return None
        try:
            meta = metadata_of(read_header(path))
            info = json.loads(meta.get(WEIGHTS_META_KEY, "{}"))
        except (DamagedFileError, ValueError) as exc:
            raise StoreError(f"imported weights {path} are damaged: {exc}") from None
        if not isinstance(info, dict):
            raise StoreError(f"imported weights {path} have bad metadata")
        info["path"] = str(path)
        info["sha256"] = sha256_file(path)
        return info

    def list_weights(self) -> list[dict[str, Any]]:
        """Imported weight files: backbone, path, size_bytes."""
        out = []
        for path in sorted(self.weights_dir.glob(f"*/*{SUFFIX}")):
            if is_temp_name(path.name):
                continue
            out.append({"backbone": f"{path.parent.name}:{path.name[: -len(SUFFIX)]}",
                        "path": str(path), "size_bytes": path.stat().st_size})
        return out


def _split_qualified(backbone: str) -> tuple[str, str]:
    if not isinstance(backbone, str) or backbone.count(":") != 1:
        raise StoreError(f"weights need a qualified backbone name 'plugin:name', "
                         f"not {backbone!r}")
    owner, name = backbone.split(":")
    return check_name(owner, "plugin name"), check_name(name, "backbone name")


def _files(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir()
                      if p.name.endswith(SUFFIX) and not p.name.startswith("."))
    except OSError:
        return []


def _referenced_hashes(path: Path) -> set[str] | None:
    """Every 64-hex string in a model's header (superset of its base reference), or None
    when the header cannot be read at all."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n > 100 * 1024 * 1024:
                return None
            text = fh.read(n)
    except OSError:
        return None
    return {m.decode() for m in _HEX64.findall(text)}


def _msg(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())


def _damaged(name: str, path: Path, exc: Exception) -> StoreError:
    return StoreError(f"model '{name}' is damaged ({path}): {_msg(exc)}; "
                      "run `tk store verify`")
