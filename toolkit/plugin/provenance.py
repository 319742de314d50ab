"""Which plugin distributions a saved model's components came from, read back.

A model records ``metadata["components"][kind] = {"name": "plugin:name", "plugin",
"distribution", "version"}`` for its backbone, head, loss, optimizer and dataset (from
:meth:`toolkit.plugin.manager.Plugins.provenance` of each owner). This module turns that
into what a user needs: which package to install when a component is missing, and whether
the installed version differs from the one the model was made with. It reads installed
versions from package metadata only: no plugin is imported.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

KINDS = ("backbone", "head", "loss", "optimizer", "dataset")  # the order they are shown in
REBUILD_KINDS = ("backbone", "head")  # what rebuilding a model for inference needs


def installed_version(distribution: str | None) -> str | None:
    """The installed version of ``distribution`` (None: not installed, or no name)."""
    if not distribution:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _components(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    found = meta.get("components")
    if not isinstance(found, Mapping):
        return {}
    order = sorted(found, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), str(k)))
    return {k: dict(found[k]) for k in order
            if isinstance(found[k], Mapping) and found[k].get("name")}


def describe(component: Mapping[str, Any]) -> str:
    """``acme:tinycnn from tk-plugin-acme 0.3.1 (installed: 0.4.0)``, or ``... (not
    installed)``; ``... from --plugin module acme`` for a plugin outside any package."""
    dist, version = component.get("distribution"), component.get("version")
    if not dist:
        return f"{component['name']} from plugin '{component.get('plugin')}' (no distribution)"
    now = installed_version(dist)
    state = ("" if now == version else " (not installed)" if now is None
             else f" (installed: {now})")
    return f"{component['name']} from {dist} {version or '?'}{state}"


def summary_lines(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``tk store show``'s line about the recorded components (none for a model that
    records none): ``[("components", "backbone acme:net from tk-plugin-acme 0.3.1 (not
    installed); head heads:linear from tk-microtoolkit 0.1.0; ...")]``."""
    found = _components(meta)
    if not found:
        return []
    return [("components", "; ".join(f"{kind} {describe(c)}" for kind, c in found.items()))]


def rebuild_hint(meta: Mapping[str, Any]) -> str:
    """What to do when a model's backbone or head cannot be rebuilt: install the missing
    distribution (naming the version the model was made with), or note the version
    drift. Empty when the model records nothing useful."""
    hints = []
    for kind, c in _components(meta).items():
        if kind not in REBUILD_KINDS:
            continue
        dist, version = c.get("distribution"), c.get("version")
        made = f" (model made with {version})" if version else ""
        if not dist:
            hints.append(f"its {kind} '{c['name']}' came from plugin '{c.get('plugin')}', "
                         "which was not an installed package: load it again with --plugin")
            continue
        now = installed_version(dist)
        if now is None:
            hints.append(f"its {kind} '{c['name']}' comes from {dist}, which is not "
                         f"installed: pip install {dist}{made}")
        elif version and now != version:
            hints.append(f"its {kind} '{c['name']}' was made with {dist} {version}, "
                         f"{now} is installed")
    return "; ".join(hints)
