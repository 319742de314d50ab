"""Helpers for testing tk plugins (and tk itself).

A plugin package's tests typically look like::

    from toolkit.testing import fresh_plugins, make_image_folder, tiny_finetune
    import my_plugin.plugin

    def test_registers_my_backbone():
        plugins = fresh_plugins(("mine", my_plugin.plugin))
        backbone = plugins.registry("backbones").build("my-net", False)
        ...

    def test_trains(tmp_path):
        data = make_image_folder(tmp_path / "data", ["cat", "dog"], per_class=4, size=32)
        run = tiny_finetune("my-net", data=data, home=tmp_path / "home",
                            plugins=["my_plugin.plugin"])
        assert run.metadata["classes"] == ["cat", "dog"]

Nothing here imports torch at module level; :func:`make_image_folder` needs Pillow and
:func:`tiny_finetune` runs ``python -m toolkit finetune`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from toolkit.plugin.manager import PluginRecord, Plugins, load_plugins

__all__ = [
    "FinetuneRun",
    "fresh_plugins",
    "isolated_env",
    "make_image_folder",
    "run_tk",
    "tiny_finetune",
]


# -- an isolated plugin manager --------------------------------------------------------------
def fresh_plugins(*plugins: Any, builtins: bool = True, strict: bool = True) -> Plugins:
    """A new :class:`toolkit.plugin.manager.Plugins` holding the built-ins (unless
    ``builtins=False``) and the given plugins, and nothing else that happens to be
    installed (no third-party entry points, no ``TK_PLUGINS``).

    Each plugin is one of:

    - a module or any object with ``@hookimpl`` functions / methods; its name (the owner in
      ``owner:name``) is the module's ``__name__`` (or the object's class name);
    - a ``(name, module_or_object)`` pair, to choose the name (use your entry-point name);
    - a string: a module to import (``"my_plugin.plugin"``) or a path to a ``.py`` file,
      exactly like ``tk --plugin``.

    With ``strict=True`` (the default) a plugin that fails to import, has a hook that does
    not fit the contract (a misspelt hook or argument name, a hook-named function without
    ``@hookimpl``) or fails inside a registration hook raises
    :class:`toolkit.errors.PluginError` instead of being recorded, so tests see it.
    """
    if builtins:
        # only the built-in distribution; their own failures stay recorded, not raised
        manager = load_plugins(env={"TK_LOAD_PLUGINS": ""})
    else:
        manager = Plugins()
    manager.strict = strict
    for plugin in plugins:
        if isinstance(plugin, str):
            name = Path(plugin).stem if plugin.endswith(".py") else plugin
            manager.import_module(plugin, PluginRecord(name, plugin, "fresh_plugins"))
            continue
        if isinstance(plugin, tuple) and len(plugin) == 2 and isinstance(plugin[0], str):
            name, obj = plugin
        else:
            obj = plugin
            name = getattr(obj, "__name__", None) or type(obj).__name__
        module = obj.__name__ if isinstance(obj, ModuleType) else type(obj).__qualname__
        manager.add(obj, PluginRecord(name, module, "fresh_plugins"))
    return manager


# -- a tiny image folder ---------------------------------------------------------------------
def make_image_folder(
    root: str | Path,
    classes: int | Sequence[str] = 2,
    per_class: int = 4,
    size: int = 32,
    *,
    format: str = "png",
    seed: int = 0,
) -> Path:
    """Write a class-per-sub-folder image dataset of real image files and return ``root``.

    ``classes``: a number (names ``class0``, ``class1``...) or the class names.
    ``format``: ``"png"``, ``"jpeg"`` or ``"mixed"`` (alternating). Each class has its own
    colour and a bright square at a class-dependent corner, plus noise, so a model can
    learn them; the same ``seed`` gives the same bytes.
    """
    import numpy as np
    from PIL import Image

    names = [f"class{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    if len(names) < 1 or len(set(names)) != len(names):
        raise ValueError(f"make_image_folder: need distinct class names, got {names}")
    if format not in ("png", "jpeg", "mixed"):
        raise ValueError(f"make_image_folder: format must be png, jpeg or mixed, not {format!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    half = max(size // 2, 1)
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        hue = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 151 + 160) % 256])
        for i in range(per_class):
            img = np.clip(hue + rng.normal(0, 20, size=(size, size, 3)), 0, 255)
            y0 = half if label % 4 >= 2 else 0
            x0 = half if label % 2 else 0
            img[y0:y0 + half, x0:x0 + half] = 255 - hue
            ext = "png" if format == "png" or (format == "mixed" and i % 2 == 0) else "jpg"
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{name}_{i:03d}.{ext}")
    return root


# -- the CLI in a subprocess -----------------------------------------------------------------
def isolated_env(home: str | Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` with tk's store and the frameworks' caches moved under ``home``
    (TK_HOME, TORCH_HOME, HF_HOME, XDG_DATA_HOME, XDG_CACHE_HOME), then ``env`` on top."""
    home = Path(home)
    out = dict(os.environ)
    out.update(
        TK_HOME=str(home / "tk"),
        TORCH_HOME=str(home / "torch"),
        HF_HOME=str(home / "hf"),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CACHE_HOME=str(home / "cache"),
        HF_HUB_OFFLINE="1",
    )
    out.update(env or {})
    return out


def run_tk(
    *args: str,
    home: str | Path,
    plugins: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    python: str | None = None,
    timeout: float = 600,
    cwd: str | Path | None = None,
    nproc: int = 0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m toolkit [--plugin P]... ARGS`` with :func:`isolated_env` (``home``,
    ``env`` = extra variables) and return the completed process (text stdout / stderr; no
    exception on failure). ``python``: another interpreter (e.g. a virtual environment's).
    ``nproc`` > 0: under ``torchrun --standalone --nproc_per_node NPROC`` instead.

    A run still going after ``timeout`` seconds is stopped with every process it started
    (its own process group): first SIGABRT, so Python's fault handler writes each process's
    stack to stderr (where it waited), then SIGKILL; the result has a negative return code
    and that stderr, ending with a line saying it timed out."""
    python = python or sys.executable
    plugin_args = [a for p in plugins for a in ("--plugin", str(p))]
    launcher = [python, "-m", "toolkit"]
    if nproc:
        launcher = [python, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(nproc), "-m", "toolkit"]
    full_env = isolated_env(home, env)
    full_env.setdefault("PYTHONFAULTHANDLER", "1")
    proc = subprocess.Popen([*launcher, *plugin_args, *map(str, args)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop_group(proc)
        err += f"\n[run_tk: timed out after {timeout:g} s; the stacks above show where]\n"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop_group(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGABRT then SIGKILL to ``proc``'s process group; what it wrote until then."""
    import signal

    for sig, grace in ((signal.SIGABRT, 15.0), (signal.SIGKILL, 15.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # children the launcher left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return out, err
    return "", ""


@dataclass
class FinetuneRun:
    """What :func:`tiny_finetune` ran and what came out of it."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    store: Path
    name: str
    metadata: dict[str, Any] | None  # ``tk store show NAME --json``; None if it failed

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def tiny_finetune(
    backbone: str,
    *,
    classes: int = 2,
    data: str | Path | None = None,
    dataset: str | None = None,
    head: str | None = None,
    loss: str | None = None,
    optimizer: str | None = None,
    epochs: int = 1,
    batch_size: int = 8,
    image_size: int | None = None,
    pretrained: bool = False,
    opts: Iterable[str] = (),
    extra_args: Iterable[str] = (),
    plugins: Iterable[str] = (),
    name: str = "tiny",
    home: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
    timeout: float = 600,
    check: bool = True,
) -> FinetuneRun:
    """Run a tiny real ``tk finetune`` on CPU in a subprocess and read back the model's
    metadata with ``tk store show NAME --json``.

    The store is ``home/tk`` (``TK_HOME``; ``home`` defaults to a new temporary directory)
    and the caches live under ``home`` too (see :func:`isolated_env`). ``pretrained=False``
    (the default) passes ``--no-pretrained``, so no weight file is needed. ``opts`` are
    ``--opt COMPONENT.KEY=VALUE`` items, ``plugins`` are ``--plugin`` modules, ``extra_args``
    go to ``tk finetune`` as they are. With ``check=True`` a failing run raises
    ``AssertionError`` carrying its stderr.
    """
    home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="tk-tiny-"))
    args = ["finetune", "--backbone", backbone, "--classes", str(classes),
            "--epochs", str(epochs), "--batch-size", str(batch_size),
            "--device", "cpu", "--workers", "0", "--name", name]
    for flag, value in (("--data", data), ("--dataset", dataset), ("--head", head),
                        ("--loss", loss), ("--optimizer", optimizer),
                        ("--image-size", image_size)):
        if value is not None:
            args += [flag, str(value)]
    if not pretrained:
        args.append("--no-pretrained")
    for item in opts:
        args += ["--opt", item]
    args += list(map(str, extra_args))
    plugins = list(plugins)
    proc = run_tk(*args, home=home, plugins=plugins, env=env, python=python, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"tk {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    metadata = None
    if proc.returncode == 0:
        show = run_tk("store", "show", name, "--json", home=home, plugins=plugins, env=env,
                      python=python, timeout=timeout)
        if show.returncode == 0:
            try:
                metadata = json.loads(show.stdout)
            except json.JSONDecodeError:
                metadata = None
    return FinetuneRun(args, proc.returncode, proc.stdout, proc.stderr, home / "tk", name,
                       metadata)
