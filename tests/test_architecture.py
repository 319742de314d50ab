"""The house rules, read from the code's own imports (module-level, function-level and
type-checking ones alike):

- ``model_store`` imports nothing from ``toolkit`` but ``toolkit.errors``, and nothing from
  ``plugins``: the store hands back tensors and metadata, toolkit rebuilds modules;
- ``toolkit`` never imports the built-in ``plugins`` package (the core names no concrete
  component; built-ins load through entry points like any third party);
- inside ``toolkit`` the layers only import downwards (a layer may use its own modules and
  any lower layer): errors/env < plugin < model < data, devices, distributed, plots, metrics <
  train, predict < cli, testing;
- no cycle between packages or sub-packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolkit", "model_store", "plugins")

# unit -> layer; a module belongs to the longest unit its dotted name starts with
LAYERS = {
    "toolkit": 0,  # the package face (load_model); nothing inside imports it
    "toolkit.version": 0,
    "toolkit.errors": 0,
    "toolkit.env": 0,
    "toolkit.progress": 0,
    "toolkit.plugin": 1,
    "toolkit.model": 2,
    "toolkit.data": 3,
    "toolkit.devices": 3,
    "toolkit.distributed": 3,
    "toolkit.plots": 3,
    "toolkit.metrics": 3,
    "toolkit.train": 4,
    "toolkit.predict": 4,
    "toolkit.cli": 5,
    "toolkit.testing": 5,
    "toolkit.__main__": 6,
}
# the package face may name anything lazily (``toolkit.load_model`` imports inside)
FACE = "toolkit/__init__.py"


def _module_name(path: Path) -> str:
    if not path.is_relative_to(ROOT):
        return path.stem
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = _module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import submodule` imports the submodule
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _sources() -> list[Path]:
    files: list[Path] = []
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def _unit(module: str) -> str | None:
    """The layer unit of a module of ours (None for third-party modules)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    if module.startswith("model_store"):
        return "model_store"
    if module.startswith("plugins"):
        return "plugins"
    best = None
    for unit in LAYERS:
        if module == unit or module.startswith(unit + "."):
            if best is None or len(unit) > len(best):
                best = unit
    return best


def _resolve(imported: str) -> str | None:
    """The unit an imported dotted name belongs to (``toolkit.errors.TkError`` ->
    ``toolkit.errors``)."""
    return _unit(imported)


def _edges() -> list[tuple[str, int, str, str]]:
    """(file, line, from unit, to unit) for every import between two different units."""
    edges = []
    for path in _sources():
        src_unit = _unit(_module_name(path))
        for line, imported in _imports(path):
            dst = _resolve(imported)
            if dst is None or dst == src_unit:
                continue
            edges.append((str(path.relative_to(ROOT)), line, src_unit or "?", dst))
    return edges


def test_model_store_imports_only_toolkit_errors() -> None:
    bad = []
    for path in sorted((ROOT / "model_store").rglob("*.py")):
        for line, imported in _imports(path):
            top = imported.split(".")[0]
            if top == "plugins" or (top == "toolkit" and not (
                    imported == "toolkit.errors" or imported.startswith("toolkit.errors."))):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}")
    assert not bad, "\n".join(bad)


def test_toolkit_never_imports_the_builtin_plugins() -> None:
    bad = [f"{f}:{line}: imports {dst}" for f, line, src, dst in _edges()
           if src.startswith("toolkit") and dst == "plugins"]
    assert not bad, "\n".join(bad)


def test_nothing_inside_imports_the_package_face() -> None:
    """``toolkit/__init__.py`` reaches up to the model layer (``load_model``): a module that
    imports it (``from toolkit import __version__``) would point back up. The version lives
    in ``toolkit.version``."""
    bad = [f"{f}:{line}: imports the package face 'toolkit'" for f, line, src, dst in _edges()
           if dst == "toolkit" and src.startswith("toolkit.")
           and LAYERS.get(src, 0) < LAYERS["toolkit.cli"]]
    assert not bad, "\n".join(bad)


def test_toolkit_layers_import_only_downwards() -> None:
    bad = []
    for f, line, src, dst in _edges():
        if f == FACE or src not in LAYERS or dst not in LAYERS:
            continue
        if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and LAYERS[src] > 0):
            bad.append(f"{f}:{line}: {src} (layer {LAYERS[src]}) imports {dst} "
                       f"(layer {LAYERS[dst]})")
    assert not bad, "\n".join(bad)


def test_builtin_plugins_use_only_the_plugin_facing_layers() -> None:
    """Plugins build components; they know nothing of training loops, runners or the CLI."""
    bad = [f"{f}:{line}: plugins import {dst}" for f, line, src, dst in _edges()
           if src == "plugins" and dst in LAYERS and LAYERS[dst] > 3]
    assert not bad, "\n".join(bad)


def test_no_cycle_between_packages_or_subpackages() -> None:
    graph: dict[str, set[str]] = {}
    for f, _line, src, dst in _edges():
        if f == FACE:
            continue
        graph.setdefault(src, set()).add(dst)
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_rules_see_function_level_imports(tmp_path: Path) -> None:
    """The scanner is not fooled by imports hidden inside functions."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from toolkit.cli import main\n    import plugins.heads\n")
    assert [m for _, m in _imports(sample)] == ["toolkit.cli.main", "plugins.heads"]
