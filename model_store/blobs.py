"""Content-addressed tensor blobs: every heavy tensor of the store is kept once, here.

A blob is a plain safetensors file ``bases/<sha256>.safetensors`` whose name is the sha256
of its bytes (so it checks itself). Its header metadata ``tk_blob`` holds the content hash
of each tensor (:func:`tensor_hash`: dtype, shape and bytes), so the store can find a
tensor it already has by reading headers only. Imported pretrained weights are one blob
(keys as in the source file, so a backbone factory can read it as its weights file);
models refer to blob tensors by ``(blob sha256, key)`` instead of copying them.

Blobs written by tk 0.x format 1 ("bases") have no ``tk_blob`` map; their tensor hashes are
computed from the file when a save needs them.

Writes happen under the store lock (:func:`model_store.atomic.store_lock`), held by the
caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.atomic import atomic_write, fsync_dir, is_temp_name
from model_store.fileformat import (
    DamagedFileError,
    load_tensors,
    metadata_of,
    parse_header,
    read_header,
    serialize,
    tensor_names,
)
from model_store.files import (
    NotRegularFileError,
    freed_by_unlink,
    open_regular,
    sha256_file,
)
from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"
BLOB_META_KEY = "tk_blob"
BLOB_FORMAT = 2
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_TAG = b"tk-tensor-v1\n"
_CHUNK = 1 << 20

# torch dtype name -> safetensors dtype code (what the file header says)
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
          "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
          "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e4m3fnuz": "F8_E4M3FNUZ",
          "float8_e5m2": "F8_E5M2", "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
          "uint64": "U64", "uint32": "U32", "uint16": "U16"}

Signature = tuple[str, tuple[int, ...]]  # (dtype code, shape)


def dtype_code(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return _CODES.get(name, name.upper())


def _hasher(code: str, shape: Iterable[int]) -> Any:
    h = hashlib.sha256(_HASH_TAG)
    h.update(f"{code}{list(shape)}\n".encode())
    return h


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (as safetensors stores them)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = _hasher(dtype_code(t.dtype), t.shape)
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def signature(t: torch.Tensor) -> Signature:
    return dtype_code(t.dtype), tuple(int(s) for s in t.shape)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Blobs:
    """The blob folder: write, find by tensor hash, check, read, remove unreferenced."""

    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, sha: str) -> Path:
        return self.dir / f"{sha}{SUFFIX}"

    def shas(self) -> list[str]:
        """Every blob's sha256 (from the file names; temp files and strays left out)."""
        try:
            entries = os.listdir(self.dir)
        except OSError:
            return []
        return sorted(e[: -len(SUFFIX)] for e in entries
                      if e.endswith(SUFFIX) and not is_temp_name(e)
                      and _SHA_RE.match(e[: -len(SUFFIX)]))

    def size(self, sha: str) -> int:
        try:
            return os.stat(self.path(sha)).st_size
        except OSError:
            return 0

    def data_bytes(self, sha: str) -> int:
        """Bytes of tensor data in blob ``sha`` (its size less the header)."""
        try:
            with open_regular(self.path(sha)) as fh:
                n = int.from_bytes(fh.read(8), "little")
                return max(0, os.fstat(fh.fileno()).st_size - 8 - n)
        except (StoreError, OSError):
            return 0

    # -- finding tensors -------------------------------------------------------------
    def tensor_hashes(self, sha: str, wanted: set[Signature] | None = None
                      ) -> dict[str, str]:
        """key -> content hash for the tensors of blob ``sha``: from its ``tk_blob`` map, or
        (format-1 bases) hashed from the file, only for tensors whose (dtype, shape) is in
        ``wanted``. An unreadable blob has none."""
        path = self.path(sha)
        try:
            header = read_header(path)
        except (StoreError, OSError):
            return {}
        known = _blob_map(header)
        if known is not None:
            return known
        entries = {k: header[k] for k in tensor_names(header)
                   if wanted is None
                   or (header[k]["dtype"], tuple(header[k]["shape"])) in wanted}
        if not entries:
            return {}
        out: dict[str, str] = {}
        try:
            with open_regular(path) as fh:
                start = 8 + int.from_bytes(fh.read(8), "little")
                for key, entry in entries.items():
                    begin, end = entry["data_offsets"]
                    fh.seek(start + begin)
                    h = _hasher(entry["dtype"], entry["shape"])
                    left = end - begin
                    while left > 0:
                        chunk = fh.read(min(_CHUNK, left))
                        if not chunk:
                            return {}
                        h.update(chunk)
                        left -= len(chunk)
                    out[key] = h.hexdigest()
        except (StoreError, OSError):
            return {}
        return out

    def find(self, wanted: Mapping[str, Signature], skip: set[str] = frozenset()
             ) -> dict[str, list[tuple[str, str]]]:
        """Where the store already holds the content hashes in ``wanted`` (hash ->
        signature): hash -> [(blob sha256, key), ...]. Blobs in ``skip`` are left out.
        Blobs with a tensor map are searched first (headers only); format-1 bases, whose
        tensors must be hashed from the file, only for what is still missing."""
        found: dict[str, list[tuple[str, str]]] = {}
        legacy = []
        for sha in self.shas():
            if sha in skip or not wanted:
                continue
            known = self.tensor_map(sha)
            if known is None:
                legacy.append(sha)
                continue
            for key, h in known.items():
                if h in wanted:
                    found.setdefault(h, []).append((sha, key))
        missing = {h: sig for h, sig in wanted.items() if h not in found}
        for sha in legacy:
            if not missing:
                break
            for key, h in self.tensor_hashes(sha, set(missing.values())).items():
                if h in wanted:
                    found.setdefault(h, []).append((sha, key))
                    missing.pop(h, None)
        return found

    def tensor_map(self, sha: str) -> dict[str, str] | None:
        """The ``tk_blob`` map (key -> content hash) of blob ``sha``; None for a format-1
        base or an unreadable header."""
        try:
            return _blob_map(read_header(self.path(sha)))
        except (StoreError, OSError):
            return None

    # -- writing ---------------------------------------------------------------------
    def write(self, tensors: Mapping[str, torch.Tensor], hashes: Mapping[str, str],
              what: str = "shared weights") -> tuple[str, int, bool]:
        """Store ``tensors`` as one blob (``hashes``: their :func:`tensor_hash`; ``what``
        names them in errors). Returns (sha256, size, whether a new file was written):
        identical content is one file."""
        if not tensors:
            raise StoreError("cannot write an empty blob")
        meta = {BLOB_META_KEY: json.dumps({"format_version": BLOB_FORMAT,
                                           "tensors": {k: hashes[k] for k in tensors}},
                                          sort_keys=True, separators=(",", ":"))}
        raw = serialize(dict(tensors), meta)
        sha = hashlib.sha256(raw).hexdigest()
        path = self.path(sha)
        if self.problem(sha) is None:
            return sha, len(raw), False
        atomic_write(path, [raw], what)
        return sha, len(raw), True

    # -- checking and reading --------------------------------------------------------
    def problem(self, sha: str) -> str | None:
        """None when blob ``sha`` is present and whole, else what is wrong (one line)."""
        path = self.path(sha)
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            return f"blob {sha[:12]} is missing ({path})"
        except NotRegularFileError as exc:
            return f"blob {sha[:12]} is {exc.kind}, not a file ({path})"
        except OSError as exc:
            return f"blob {sha[:12]} is unreadable ({path}: {exc.strerror})"
        if actual != sha:
            return f"blob {sha[:12]} is damaged ({path}: sha256 mismatch)"
        return None

    def check_file(self, sha: str) -> str | None:
        """:meth:`problem`, plus the header: structure and its ``tk_blob`` map."""
        bad = self.problem(sha)
        if bad:
            return bad
        try:
            header = read_header(self.path(sha))
        except (StoreError, OSError) as exc:
            return f"blob {sha[:12]} has a bad header ({exc})"
        known = _blob_map(header)
        if known is not None and set(known) != set(tensor_names(header)):
            return f"blob {sha[:12]}: its tensor map does not match its tensors"
        return None

    def keys(self, sha: str) -> set[str]:
        try:
            return set(tensor_names(read_header(self.path(sha))))
        except (StoreError, OSError):
            return set()

    def load(self, sha: str, what: str) -> dict[str, torch.Tensor]:
        """Every tensor of blob ``sha``, its sha256 checked; ``what`` names the reader in
        errors (``model 'x'``)."""
        path = self.path(sha)
        try:
            with open_regular(path) as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise StoreError(f"{what}: its shared weights (blob {sha[:12]}) are missing "
                             f"({path}); run `tk store verify`") from None
        except NotRegularFileError as exc:
            raise StoreError(f"{what}: its shared weights {path} are {exc.kind}, not a file"
                             ) from None
        except OSError as exc:
            raise StoreError(f"{what}: cannot read its shared weights {path}: "
                             f"{exc.strerror}") from exc
        if hashlib.sha256(raw).hexdigest() != sha:
            raise StoreError(f"{what}: its shared weights (blob {sha[:12]}) are damaged "
                             f"({path}: sha256 mismatch); run `tk store verify`")
        try:
            parse_header(raw, len(raw))
            return load_tensors(raw)
        except DamagedFileError as exc:
            raise StoreError(f"{what}: its shared weights {path} are unreadable: {exc}"
                             ) from None

    # -- garbage collection ----------------------------------------------------------
    def remove_unreferenced(self, referenced: set[str]) -> list[tuple[Path, int]]:
        """Delete every blob whose sha256 is not in ``referenced``; (path, bytes freed)."""
        removed = []
        for sha in self.shas():
            if sha in referenced:
                continue
            path = self.path(sha)
            freed = freed_by_unlink(path)
            try:
                path.unlink()
            except OSError:
                continue
            removed.append((path, freed))
        if removed:
            fsync_dir(self.dir)
        return removed


def _blob_map(header: dict[str, Any]) -> dict[str, str] | None:
    """The ``tk_blob`` tensor map of a blob header (None for format-1 bases or garbage)."""
    text = metadata_of(header).get(BLOB_META_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
        tensors = data["tensors"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _SHA_RE.match(v)
            for k, v in tensors.items()):
        return None
    return tensors
