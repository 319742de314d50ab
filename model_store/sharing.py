"""Which tensors of a model stay in its file and which it takes from shared blobs.

Saving (under the store lock):

1. every tensor the caller lets share, and every other tensor of at least
   :data:`MIN_FOUND_BYTES`, is hashed (:func:`~model_store.blobs.tensor_hash`);
2. a tensor whose hash a blob already holds is referenced, never copied (so a frozen
   backbone on imported weights costs nothing, and a partly frozen model shares its frozen
   layers even if nobody said so) -- provided the model takes enough from that blob
   (:func:`worth_referencing`): a blob cannot be freed in part, so a few coincidentally
   equal tensors (all ones, a step counter) must not keep a large blob alive;
3. shareable tensors found in no such blob go into one new blob (identical tensors once),
   so the next model on the same random or converted weights shares them;
4. the rest (the trained head, tuned layers) stays in the model file.

The model's metadata then holds ``shared = {"blobs": [{"sha256", "bytes"}], "tensors":
{model key: [blob index, blob key]}}``. Format-1 models hold ``base = {"sha256",
"prefix"}`` instead: every tensor of that blob under ``prefix``; both are read here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from model_store.blobs import Blobs, Signature, nbytes, signature, tensor_hash
from toolkit.errors import StoreError

if TYPE_CHECKING:
    import torch

MIN_FOUND_BYTES = 1024  # smaller tensors stay in the model file unless declared shareable
MIN_REFERENCED_BYTES = 1 << 20  # a blob is worth referring to from this many bytes used...
MIN_REFERENCED_SHARE = 0.5  # ... or from this share of its size


def worth_referencing(used_bytes: int, blob_bytes: int) -> bool:
    """Whether a model that would take ``used_bytes`` from a blob holding ``blob_bytes`` of
    tensor data should refer to it (else it keeps its own copy of those tensors)."""
    return used_bytes >= MIN_REFERENCED_BYTES or used_bytes >= MIN_REFERENCED_SHARE * blob_bytes


def shareable_keys(keys: Iterable[str], shared: Iterable[str] | None,
                   shared_prefix: str | None, what: str) -> set[str]:
    """The keys named by ``shared`` (entries ending in ``.`` are prefixes) and
    ``shared_prefix``; an entry that names no tensor is a caller's mistake."""
    keys = list(keys)
    entries = list(shared or ())
    if shared_prefix:
        entries.append(shared_prefix)
    out: set[str] = set()
    present = set(keys)
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise StoreError(f"cannot save {what}: bad shared entry {entry!r}")
        if entry.endswith("."):
            matched = {k for k in keys if k.startswith(entry)}
            if not matched:
                raise StoreError(f"cannot save {what}: no tensor name starts with {entry!r}")
            out |= matched
        elif entry in present:
            out.add(entry)
        else:
            raise StoreError(f"cannot save {what}: no tensor {entry!r} to share")
    return out


@dataclass
class Plan:
    own: dict[str, Any]  # key -> tensor, kept in the model file
    refs: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (sha, blob key)
    new: dict[str, Any] = field(default_factory=dict)  # blob key -> tensor, for a new blob
    new_hashes: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # key -> blob key in the new blob


def hash_candidates(tensors: Mapping[str, torch.Tensor], shareable: set[str]
                    ) -> dict[str, str]:
    """Content hashes of the tensors that may end up in a blob (no lock needed)."""
    return {k: tensor_hash(t) for k, t in tensors.items()
            if k in shareable or nbytes(t) >= MIN_FOUND_BYTES}


def plan(tensors: Mapping[str, torch.Tensor], hashes: Mapping[str, str],
         shareable: set[str], blobs: Blobs) -> Plan:
    """Decide where each tensor goes (call with the store lock held). Blobs are searched
    by header; each blob the plan refers to is checked whole, and a damaged one is never
    referred to (its tensors are stored again)."""
    wanted: dict[str, Signature] = {hashes[k]: signature(t) for k, t in tensors.items()
                                    if k in hashes}
    bad: set[str] = set()
    while True:
        found = _choose(blobs.find(wanted, skip=bad), tensors, hashes, blobs)
        damaged = {sha for sha, _ in found.values() if blobs.problem(sha) is not None}
        if not damaged:
            break
        bad |= damaged
    out = Plan(own={})
    first: dict[str, str] = {}  # hash -> blob key in the new blob
    for key, t in tensors.items():
        h = hashes.get(key)
        if h is not None and h in found:
            out.refs[key] = found[h]
        elif key in shareable:
            assert h is not None
            if h not in first:
                first[h] = key
                out.new[key] = t
                out.new_hashes[key] = h
            out.aliases[key] = first[h]
        else:
            out.own[key] = t
    return out


def _choose(candidates: Mapping[str, list[tuple[str, str]]],
            tensors: Mapping[str, torch.Tensor], hashes: Mapping[str, str], blobs: Blobs
            ) -> dict[str, tuple[str, str]]:
    """hash -> the (blob, key) to refer to: only blobs worth referencing, the one the model
    takes most from first."""
    used: dict[str, int] = {}
    for key, t in tensors.items():
        for sha in {sha for sha, _ in candidates.get(hashes.get(key, ""), ())}:
            used[sha] = used.get(sha, 0) + nbytes(t)
    good = {sha for sha, n in used.items() if worth_referencing(n, blobs.data_bytes(sha))}
    out = {}
    for h, places in candidates.items():
        ok = [p for p in places if p[0] in good]
        if ok:
            out[h] = max(ok, key=lambda p: (used[p[0]], p[0]))
    return out


def commit(p: Plan, tensors: Mapping[str, torch.Tensor], blobs: Blobs
           ) -> dict[str, Any] | None:
    """Write the plan's new blob (if any); return the model's ``shared`` metadata."""
    refs = dict(p.refs)
    if p.new:
        sha, _size, _written = blobs.write(p.new, p.new_hashes)
        refs.update({k: (sha, blob_key) for k, blob_key in p.aliases.items()})
    if not refs:
        return None
    order = list(dict.fromkeys(sha for sha, _ in refs.values()))
    index = {sha: i for i, sha in enumerate(order)}
    used = [0] * len(order)
    seen: set[tuple[str, str]] = set()
    for key, ref in refs.items():
        if ref not in seen:
            seen.add(ref)
            used[index[ref[0]]] += nbytes(tensors[key])
    return {"blobs": [{"sha256": sha, "bytes": used[i]} for i, sha in enumerate(order)],
            "tensors": {k: [index[sha], blob_key] for k, (sha, blob_key) in sorted(refs.items())}}


def references(meta: Mapping[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """[(blob sha256, {model key: blob key})] a model's metadata refers to; a format-1
    ``base`` gives ``{prefix + key: key}`` for every key of that blob, as ``{"*": prefix}``."""
    out: list[tuple[str, dict[str, str]]] = []
    base = meta.get("base")
    if base:
        out.append((base["sha256"], {"*": base["prefix"]}))
    shared = meta.get("shared")
    if shared:
        per: list[dict[str, str]] = [{} for _ in shared["blobs"]]
        for key, (index, blob_key) in shared["tensors"].items():
            per[index][key] = blob_key
        out.extend((b["sha256"], m) for b, m in zip(shared["blobs"], per, strict=True))
    return out


def shared_bytes(meta: Mapping[str, Any]) -> int:
    total = 0
    base = meta.get("base")
    if base and isinstance(base.get("size_bytes"), int):
        total += base["size_bytes"]
    shared = meta.get("shared")
    if shared:
        total += sum(b.get("bytes", 0) for b in shared["blobs"])
    return total


def resolve(meta: Mapping[str, Any], own: Mapping[str, torch.Tensor], blobs: Blobs,
            what: str) -> dict[str, torch.Tensor]:
    """The model's full state: its own tensors plus those it takes from blobs (each blob
    read once and checked whole)."""
    tensors = dict(own)
    for sha, mapping in references(meta):
        data = blobs.load(sha, what)
        if "*" in mapping:  # format 1: the whole base under a prefix
            items = {mapping["*"] + k: k for k in data}
        else:
            items = mapping
        used: set[str] = set()
        for key, blob_key in items.items():
            if key in tensors:
                raise StoreError(f"{what}: tensor {key!r} is both in the model file and in "
                                 "its shared weights")
            if blob_key not in data:
                raise StoreError(f"{what}: its shared weights (blob {sha[:12]}) have no "
                                 f"tensor {blob_key!r}; run `tk store verify`")
            t = data[blob_key]
            tensors[key] = t.clone() if blob_key in used else t
            used.add(blob_key)
        del data
    return tensors
