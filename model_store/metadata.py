"""Model metadata: what the store adds, and the checks every loaded header goes through.

Metadata is data only: nothing in it is evaluated or imported; component names in
``spec`` are resolved later through the plugin registry.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any

from toolkit.errors import StoreError

FORMAT_VERSION = 2  # 2: tensors shared through blobs ("shared"); 1: one "base" per model
META_KEY = "tk"  # the safetensors header metadata key holding the JSON
REQUIRED = ("spec", "classes", "data_config", "training", "metrics", "weights")
STORE_KEYS = ("format_version", "name", "created", "base", "shared")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: Any, what: str = "model name") -> str:
    """A name that is safe as a file name: letters, digits, ``._+-``, no leading dot."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".tmp"):
        raise StoreError(
            f"invalid {what} {name!r}: use letters, digits and . _ + - (no path separators, "
            "no leading dot, at most 128 characters)")
    return name


def check_sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA_RE.match(value):
        raise StoreError(f"invalid sha256 {value!r}")
    return value


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def to_json(meta: dict[str, Any]) -> str:
    try:
        return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"model metadata is not JSON-serialisable: {exc}") from exc


class _Bad(Exception):
    pass


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise _Bad(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _check_spec(spec: Any) -> None:
    _need(isinstance(spec, dict), "'spec' is not an object")
    for part in ("backbone", "head"):
        entry = spec.get(part)
        _need(isinstance(entry, dict), f"'spec.{part}' is not an object")
        _need(isinstance(entry.get("name"), str) and entry["name"] != "",
              f"'spec.{part}.name' is not a non-empty string")
        _need(isinstance(entry.get("options", {}), dict),
              f"'spec.{part}.options' is not an object")
    n = spec.get("num_classes")
    _need(_is_int(n) and 1 <= n <= 1_000_000, "'spec.num_classes' is not a positive integer")


def _check_data_config(dc: Any) -> None:
    _need(isinstance(dc, dict), "'data_config' is not an object")
    size = dc.get("input_size")
    _need(isinstance(size, list) and len(size) == 3
          and all(_is_int(x) and 0 < x <= 8192 for x in size),
          "'data_config.input_size' is not three positive integers up to 8192")
    for key in ("mean", "std"):
        v = dc.get(key)
        _need(isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v),
              f"'data_config.{key}' is not three numbers")
    _need(all(x > 0 for x in dc["std"]), "'data_config.std' has a value <= 0")
    _need(isinstance(dc.get("interpolation", "bilinear"), str),
          "'data_config.interpolation' is not a string")
    crop = dc.get("crop_pct", 0.875)
    _need(_is_num(crop) and 0 < crop <= 2, "'data_config.crop_pct' is not in (0, 2]")


def _check_base(base: Any) -> None:
    if base is None:
        return
    _need(isinstance(base, dict), "'base' is not an object")
    _need(isinstance(base.get("sha256"), str) and bool(_SHA_RE.match(base["sha256"])),
          "'base.sha256' is not a sha256 hex digest")
    _need(isinstance(base.get("prefix"), str) and base["prefix"] != "",
          "'base.prefix' is not a non-empty string")


def _check_shared(shared: Any) -> None:
    if shared is None:
        return
    _need(isinstance(shared, dict), "'shared' is not an object")
    blobs = shared.get("blobs")
    _need(isinstance(blobs, list) and len(blobs) > 0, "'shared.blobs' is not a list")
    for b in blobs:
        _need(isinstance(b, dict) and isinstance(b.get("sha256"), str)
              and bool(_SHA_RE.match(b["sha256"])),
              "'shared.blobs' has an entry without a sha256 hex digest")
        _need(_is_int(b.get("bytes", 0)) and b.get("bytes", 0) >= 0,
              "'shared.blobs' has a bad byte count")
    tensors = shared.get("tensors")
    _need(isinstance(tensors, dict) and len(tensors) > 0, "'shared.tensors' is not an object")
    for key, ref in tensors.items():
        _need(isinstance(ref, list) and len(ref) == 2 and _is_int(ref[0])
              and 0 <= ref[0] < len(blobs) and isinstance(ref[1], str) and ref[1] != "",
              f"'shared.tensors' entry {key!r} is not [blob index, key]")


def validate_user_metadata(meta: Any) -> None:
    """Check what a caller hands to ``save`` (before anything is written)."""
    try:
        _need(isinstance(meta, dict), "metadata is not a dict")
        missing = [k for k in REQUIRED if k not in meta]
        _need(not missing, f"missing key(s) {', '.join(missing)}")
        _check_common(meta)
    except _Bad as exc:
        raise StoreError(f"cannot save model: bad metadata: {exc}") from None


def _check_common(meta: dict[str, Any]) -> None:
    _check_spec(meta["spec"])
    classes = meta["classes"]
    _need(isinstance(classes, list) and all(isinstance(c, str) for c in classes),
          "'classes' is not a list of strings")
    _need(len(classes) == meta["spec"]["num_classes"],
          f"{len(classes)} class names for {meta['spec']['num_classes']} classes")
    _need(len(set(classes)) == len(classes), "'classes' has duplicate names")
    _check_data_config(meta["data_config"])
    for key in ("training", "metrics", "weights"):
        _need(isinstance(meta[key], dict), f"'{key}' is not an object")


def parse_stored_metadata(file_meta: dict[str, str], what: str) -> dict[str, Any]:
    """The validated metadata of a stored model, from its safetensors header metadata.
    A damaged or hand-edited header gives one clear :class:`StoreError` line."""
    text = file_meta.get(META_KEY)
    if text is None:
        raise StoreError(f"{what}: no tk metadata in the file (not a tk model)")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{what}: metadata is not valid JSON ({exc})") from None
    try:
        _need(isinstance(meta, dict), "metadata is not an object")
        version = meta.get("format_version")
        _need(_is_int(version), "'format_version' is missing or not an integer")
        if version > FORMAT_VERSION:
            raise StoreError(f"{what}: format version {version} is newer than this tk "
                             f"understands ({FORMAT_VERSION}); upgrade tk")
        missing = [k for k in (*REQUIRED, "created") if k not in meta]
        _need(not missing, f"missing key(s) {', '.join(missing)}")
        _need(isinstance(meta["created"], str), "'created' is not a string")
        try:
            datetime.fromisoformat(meta["created"])
        except ValueError:
            raise _Bad("'created' is not an ISO date") from None
        _check_common(meta)
        _check_base(meta.get("base"))
        _check_shared(meta.get("shared"))
    except _Bad as exc:
        raise StoreError(f"{what}: bad metadata: {exc}") from None
    return meta


def metrics_summary(metrics: Any) -> dict[str, float]:
    """The scalar entries of a metrics dict (what `tk store list` shows)."""
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
