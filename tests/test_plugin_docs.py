"""docs/plugins.md against the code: the reference tables and signatures match the
dataclasses and functions they document, and the walkthrough works as written (its files
are written out, built into a wheel, installed, and its commands run with their printed
output compared).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from toolkit.testing import isolated_env, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")


# -- the reference: "#### `dotted.name`" followed by a table or a code block ---------------
def reference_entries() -> dict[str, str]:
    """``{dotted name: the text under its heading}`` for every ``#### `x.y.z` `` heading."""
    parts = re.split(r"^#### `([\w.]+)`\n", GUIDE, flags=re.M)
    return {name: body.split("\n## ")[0].split("\n#### ")[0]
            for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def resolve(dotted: str) -> Any:
    module, _, rest = dotted.partition(".")
    obj: Any = importlib.import_module(module)
    path = module
    for part in rest.split("."):
        try:
            obj = importlib.import_module(f"{path}.{part}")
        except ImportError:
            obj = getattr(obj, part)
        path = f"{path}.{part}"
    return obj


def table_rows(body: str) -> list[list[str]]:
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
            for row in rows]


def unquote(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), cell
    return cell[1:-1]


def signature_block(body: str) -> str:
    block = re.search(r"```python\n(.*?)```", body, re.S)
    assert block, "no ```python block"
    return block.group(1).strip()


ENTRIES = reference_entries()


def test_the_reference_covers_what_plugin_authors_meet() -> None:
    assert {"toolkit.model.backbone.Backbone", "toolkit.model.backbone.DataConfig",
            "toolkit.model.backbone.WeightsInfo", "toolkit.data.datasets.DatasetSource",
            "toolkit.plugin.hookspecs.EpochMetrics", "toolkit.plugin.registry.Registry.build",
            "toolkit.testing.tiny_finetune", "toolkit.testing.fresh_plugins",
            "toolkit.model.weights.resolve_pretrained"} <= set(ENTRIES)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_reference_entry_matches_the_code(name: str) -> None:
    obj = resolve(name)
    body = ENTRIES[name]
    if dataclasses.is_dataclass(obj):
        check_dataclass(obj, table_rows(body))
    elif typing.is_typeddict(obj):
        hints = typing.get_type_hints(obj)
        rows = table_rows(body)
        assert [unquote(r[0]) for r in rows] == list(hints)
        assert [unquote(r[1]) for r in rows] == [t.__name__ for t in hints.values()]
    elif getattr(obj, "_is_protocol", False):
        check_protocol(obj, signature_block(body))
    else:
        check_signature(obj, signature_block(body))


def check_dataclass(cls: type, rows: list[list[str]]) -> None:
    fields = dataclasses.fields(cls)
    assert [unquote(r[0]) for r in rows] == [f.name for f in fields], "fields or their order"
    namespace = vars(sys.modules[cls.__module__])
    for row, f in zip(rows, fields, strict=True):
        assert unquote(row[1]) == f.type, f"{f.name}: type"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert row[2] == "required", f"{f.name}: default"
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert eval(unquote(row[2]), dict(namespace)) == default, f"{f.name}: default"  # noqa: S307


def _params(source: str) -> list[tuple[str, str, Any]]:
    """``name(params) -> x`` (or a ``def``) as ``[(name, kind, default)]``."""
    source = source if source.startswith(("def ", "class ")) else f"def {source}: ..."
    func = ast.parse(source).body[0]
    assert isinstance(func, ast.FunctionDef)
    return _ast_params(func)


def _ast_params(func: ast.FunctionDef) -> list[tuple[str, str, Any]]:
    a = func.args
    out: list[tuple[str, str, Any]] = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(positional, defaults, strict=True):
        out.append((arg.arg, "positional", ast.literal_eval(d) if d else inspect.Parameter.empty))
    if a.vararg:
        out.append((a.vararg.arg, "*", inspect.Parameter.empty))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        out.append((arg.arg, "keyword", ast.literal_eval(d) if d else inspect.Parameter.empty))
    if a.kwarg:
        out.append((a.kwarg.arg, "**", inspect.Parameter.empty))
    return [p for p in out if p[0] != "self"]


KINDS = {inspect.Parameter.POSITIONAL_ONLY: "positional",
         inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
         inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.KEYWORD_ONLY: "keyword",
         inspect.Parameter.VAR_KEYWORD: "**"}


def _real_params(func: Any) -> list[tuple[str, str, Any]]:
    params = inspect.signature(func).parameters.values()
    return [(p.name, KINDS[p.kind], p.default) for p in params if p.name != "self"]


def check_signature(obj: Any, documented: str) -> None:
    name = documented.split("(")[0].split(".")[-1]
    assert name == (obj.__name__ if not inspect.isclass(obj) else obj.__name__)
    assert _params(documented.split("(", 1)[0].split(".")[-1] + "(" +
                   documented.split("(", 1)[1]) == _real_params(obj)


def check_protocol(cls: type, documented: str) -> None:
    tree = ast.parse(documented).body[0]
    assert isinstance(tree, ast.ClassDef) and tree.name == cls.__name__
    attrs = [n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)
             and isinstance(n.target, ast.Name)]
    assert attrs == list(cls.__annotations__)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            assert _ast_params(node) == _real_params(getattr(cls, node.name)), node.name


# -- the walkthrough, run as written -------------------------------------------------------
WALKTHROUGH = GUIDE.split("## Walkthrough")[1].split("\n## ")[0]


def walkthrough_files() -> dict[str, str]:
    """Code blocks whose first line is ``# PATH``."""
    files = {}
    for block in re.findall(r"```(?:python|toml)\n(.*?)```", WALKTHROUGH, re.S):
        first, _, rest = block.partition("\n")
        if re.fullmatch(r"# [\w./-]+\.(py|toml)", first):
            files[first[2:]] = rest if first.endswith(".toml") else block
    return files


def walkthrough_commands() -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` from the ``console`` blocks."""
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", WALKTHROUGH, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                out.append((line[2:], []))
            else:
                out[-1][1].append(line)
    return out


@pytest.mark.slow
def test_the_walkthrough_works_as_written(tmp_path: Path) -> None:
    project = tmp_path / "tk-plugin-hello"
    files = walkthrough_files()
    assert {"pyproject.toml", "src/tk_hello/plugin.py", "src/tk_hello/nets.py",
            "src/tk_hello/manifest.py", "tests/test_hello.py", "make_manifest.py"} <= set(files)
    for rel, text in files.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text, encoding="utf-8")
    make_image_folder(project / "photos", ["cat", "dog"], per_class=6, size=32)
    site = tmp_path / "site"
    installed = False
    home = tmp_path / "home"
    for command, expected in walkthrough_commands():
        words = shlex.split(command)
        env = isolated_env(home, {"TK_DISABLE_PLUGINS": "timm,torchvision"})
        env.pop("PYTHONPATH", None)
        if installed:
            env["PYTHONPATH"] = str(site)
        while "=" in words[0]:
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        target = None
        if ">" in words:
            target = project / words[words.index(">") + 1]
            words = words[:words.index(">")]
        program, *args = words
        if program == "pip" and args[0] == "wheel":
            argv = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                    "--no-index", *args[1:]]
        elif program == "pip" and args[0] == "install":
            argv = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                    "--target", str(site), *args[1:]]
            installed = True
        elif program == "pip" and args[0] == "uninstall":
            installed = False
            continue
        elif program == "pytest":
            argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        elif program in ("python", "tk"):
            argv = [sys.executable, *(["-m", "toolkit"] if program == "tk" else []), *args]
        else:
            raise AssertionError(f"the test does not know how to run {command!r}")
        proc = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True,
                              timeout=600)
        if target is not None:
            target.write_text(proc.stdout, encoding="utf-8")
        shown = proc.stdout if proc.returncode == 0 else proc.stderr
        if expected:
            assert shown.splitlines() == expected, (command, proc.stdout, proc.stderr)
        else:
            assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
        if program == "tk" and args[0] == "finetune":
            assert "hello: epoch 2 val_acc" in proc.stderr  # the observer
    assert os.path.isfile(site / "tk_hello" / "weights" / "hello-cnn-w8.safetensors")
