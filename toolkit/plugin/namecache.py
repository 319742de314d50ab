"""Registration lists that cost nothing to build: a plugin that registers hundreds of names
read from a heavy library (every timm model, every torchvision classifier) computes the
list once per installed version of that library and keeps it in the user cache directory,
so that registering does not import the library.

The cache is ``$XDG_CACHE_HOME/tk/names`` (``~/.cache/tk/names``), one JSON file per
(plugin, library, library version, list format). A missing, unreadable or malformed file is
recomputed; an unwritable cache directory only costs the import again next time. Nothing
here imports more than the standard library.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Entry = tuple[str, dict[str, Any]]  # (name, info passed to register)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tk/names``, else ``~/.cache/tk/names``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path("~/.cache").expanduser()
    return root / "tk" / "names"


def library_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (None when not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def cached_entries(owner: str, distribution: str, fmt: int,
                   compute: Callable[[], list[Entry]]) -> list[Entry]:
    """``compute()``'s entries, from the cache when this version of ``distribution`` was
    listed before (``fmt``: the plugin's own list-format number; bump it when the entries
    change shape)."""
    version = library_version(distribution)
    if version is None:  # not installed as a distribution: nothing to key the cache on
        return compute()
    path = cache_dir() / f"{_safe(owner)}-{_safe(distribution)}-{_safe(version)}-v{fmt}.json"
    entries = _read(path)
    if entries is None:
        entries = compute()
        _write(path, entries)
    return entries


def _read(path: Path) -> list[Entry] | None:
    try:
        if not path.is_file():  # never open a FIFO or a folder in its place
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, list):
        return None
    out: list[Entry] = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], dict)):
            return None
        out.append((item[0], item[1]))
    return out


def _write(path: Path, entries: list[Entry]) -> None:
    """Best effort, through the store's atomic writer (a reader never sees half a file);
    an unwritable cache is no error."""
    from model_store.atomic import atomic_write
    from toolkit.errors import TkError

    try:
        data = json.dumps([[name, info] for name, info in entries]).encode()
        atomic_write(path, [data], "backbone name cache")
    except (TkError, TypeError, ValueError):
        pass
