"""The store's files: plain safetensors, "sealed" with a checksum in the header.

A sealed file is a valid safetensors file whose header metadata holds ``tk_digest``:
the sha256 of the canonical header (every tensor's name, dtype, shape and offsets, and
all other metadata; the digest itself left out) followed by the whole data section. A
flipped byte anywhere in the file therefore either breaks the header (caught when it is
parsed) or changes the digest. The header is read with ``json``; the data with
``safetensors`` only: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.files import open_regular, sha256_file
from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch

DIGEST_KEY = "tk_digest"
_DIGEST_TAG = b"tk-sealed-v1\n"
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 4 * 1024 * 1024


class DamagedFileError(StoreError):
    """A store file that cannot be trusted (truncated, edited, bit rot)."""


__all__ = ["DamagedFileError", "check_tensors", "load_tensors", "metadata_of", "parse_header",
           "read_header", "read_sealed", "seal", "serialize", "sha256_file", "tensor_names",
           "verify_sealed"]


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def _without_digest(header: dict[str, Any]) -> dict[str, Any]:
    out = dict(header)
    meta = dict(out.get("__metadata__") or {})
    meta.pop(DIGEST_KEY, None)
    if meta:
        out["__metadata__"] = meta
    else:
        out.pop("__metadata__", None)
    return out


def _digest(header: dict[str, Any], data: Iterator[bytes | memoryview]) -> str:
    h = hashlib.sha256(_DIGEST_TAG)
    h.update(_canonical(_without_digest(header)))
    h.update(b"\n")
    for chunk in data:
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def parse_header(buf: bytes, file_size: int) -> tuple[dict[str, Any], int]:
    """Header dict and its length from the first bytes of a safetensors file."""
    if file_size < 8 or len(buf) < 8:
        raise DamagedFileError("too short to be a safetensors file")
    n = int.from_bytes(buf[:8], "little")
    if n < 2 or n > _MAX_HEADER or 8 + n > file_size:
        raise DamagedFileError("bad safetensors header length")
    if len(buf) < 8 + n:
        raise DamagedFileError("truncated safetensors header")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DamagedFileError(f"unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise DamagedFileError("safetensors header is not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise DamagedFileError("safetensors metadata is not a string map")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list)
                and all(type(s) is int and s >= 0 for s in entry["shape"])
                and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2
                and all(type(o) is int and o >= 0 for o in entry["data_offsets"])):
            raise DamagedFileError(f"bad tensor entry {key!r} in safetensors header")
        end = max(end, entry["data_offsets"][1])
    if 8 + n + end != file_size:
        raise DamagedFileError(
            f"size mismatch: header describes {8 + n + end} bytes, file has {file_size}")
    return header, n


def read_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file (structure checked, data not read)."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise DamagedFileError("too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise DamagedFileError("bad safetensors header length")
        buf = head + fh.read(n)
    header, _ = parse_header(buf, size)
    return header


def metadata_of(header: dict[str, Any]) -> dict[str, str]:
    return dict(header.get("__metadata__") or {})


def tensor_names(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
              ) -> bytes:
    """Plain safetensors bytes (deterministic for the same tensors and metadata)."""
    from safetensors.torch import save

    return save(_prepare(tensors), metadata=metadata)


def check_tensors(tensors: dict[str, Any]) -> None:
    """String keys and tensor values, or one :class:`StoreError` line naming the entry."""
    import torch

    for name, t in tensors.items():
        if not isinstance(name, str):
            raise StoreError(f"state dict key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise StoreError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")


def _prepare(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries sharing storage (safetensors refuses that)."""
    check_tensors(tensors)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key in seen:
                t = t.clone()
            else:
                seen.add(key)
        out[name] = t
    return out


def seal(raw: bytes, extra_metadata: dict[str, str] | None = None
         ) -> tuple[list[bytes | memoryview], str]:
    """Chunks of a sealed file made from plain safetensors bytes ``raw`` (plus
    ``extra_metadata``) and its digest."""
    header, n = parse_header(raw, len(raw))
    meta = metadata_of(header)
    meta.update(extra_metadata or {})
    meta.pop(DIGEST_KEY, None)
    if meta:
        header["__metadata__"] = meta
    data = memoryview(raw)[8 + n :]
    digest = _digest(header, iter([data]))
    header.setdefault("__metadata__", {})[DIGEST_KEY] = digest
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned, like safetensors writes
    return [len(head).to_bytes(8, "little"), head, data], digest


def verify_sealed(path: Path) -> dict[str, Any]:
    """Stream the file, check structure and digest; return the header."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or n > _MAX_HEADER or 8 + n > size:
            raise DamagedFileError("bad safetensors header length")
        header, _ = parse_header(head + fh.read(n), size)
        expected = metadata_of(header).get(DIGEST_KEY)
        if not expected:
            raise DamagedFileError("no checksum in the header (not written by tk)")

        def chunks() -> Iterator[bytes]:
            while chunk := fh.read(_CHUNK):
                yield chunk

        actual = _digest(header, chunks())
    if actual != expected:
        raise DamagedFileError("checksum mismatch: the file changed after it was written")
    return header


def read_sealed(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The whole file, checked: (bytes for ``safetensors.torch.load``, header)."""
    with open_regular(path) as fh:
        raw = fh.read()
    header, n = parse_header(raw, len(raw))
    expected = metadata_of(header).get(DIGEST_KEY)
    if not expected:
        raise DamagedFileError("no checksum in the header (not written by tk)")
    if _digest(header, iter([memoryview(raw)[8 + n :]])) != expected:
        raise DamagedFileError("checksum mismatch: the file changed after it was written")
    return raw, header


def load_tensors(raw: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (no pickle); damage -> :class:`DamagedFileError`."""
    from safetensors.torch import load

    try:
        return load(raw)
    except Exception as exc:  # SafetensorError and friends
        msg = " ".join(str(exc).split())
        raise DamagedFileError(f"unreadable tensors ({msg})") from exc
