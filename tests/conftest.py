"""Shared pytest fixtures. Keep them generic: several test modules use them."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# CI explores the same examples every run (a failure there reproduces); locally the
# property tests draw new examples each time.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


def write_image(path: Path, size: tuple[int, int] = (32, 32),
                colour: tuple[int, int, int] = (200, 30, 30), *, mode: str = "RGB",
                **save: object) -> Path:
    """Write a solid-colour image at ``path`` (format from the extension) and return it."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, **save)
    return path


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct colour per class index."""
    return ((label * 97 + 40) % 256, (label * 57 + 120) % 256, (label * 151 + 200) % 256)


@pytest.fixture
def make_image_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_image_dir({"cat": 3, "dog": 2}, root=None, size=(32, 32), ext="png")``
    writes a class-per-sub-folder tree of small solid-colour images (one colour per class,
    slightly varied per image) and returns its root (default ``tmp_path / "data"``)."""

    def make(counts: Mapping[str, int], root: Path | None = None,
             size: tuple[int, int] = (32, 32), ext: str = "png") -> Path:
        root = Path(root) if root is not None else tmp_path / "data"
        for label, (name, n) in enumerate(counts.items()):
            r, g, b = class_colour(label)
            for i in range(n):
                write_image(root / name / f"{name}_{i:03d}.{ext}", size,
                            (r, g, (b + 7 * i) % 256))
        root.mkdir(parents=True, exist_ok=True)
        return root

    return make


# -- a stored model (tests/plugins_for_tests/tiny.py backbone) ----------------------------

TINY_PLUGIN = str(Path(__file__).resolve().parent / "plugins_for_tests" / "tiny.py")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Environment for ``python -m toolkit`` subprocesses: store under ``tmp_path/store``,
    the frameworks' caches under ``tmp_path``, offline, the test plugin (``tiny-cnn``)
    loaded, one OpenMP thread, no TK_DEBUG."""
    e = dict(os.environ)
    e.update(TK_HOME=str(tmp_path / "store"), TORCH_HOME=str(tmp_path / "torch"),
             HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TK_PLUGINS=TINY_PLUGIN,
             OMP_NUM_THREADS="1")
    e.pop("TK_DEBUG", None)
    return e
COLOUR_CLASSES = ("red", "green", "blue")


def save_colour_model(store_dir: Path, name: str = "colours",
                      classes: tuple[str, str, str] = COLOUR_CLASSES,
                      extra_meta: Mapping[str, object] | None = None) -> str:
    """Store a ``tiny-cnn`` classifier (width 4) whose weights are set by hand so that it
    is right on solid colours: it predicts the strongest of the red, green and blue input
    channels (classes :data:`COLOUR_CLASSES`, or other names for the same three). Loading
    it needs :data:`TINY_PLUGIN` (``TK_PLUGINS`` or ``--plugin`` in subprocesses).
    ``extra_meta`` goes into its metadata (e.g. a calibration record). Returns the model
    name."""
    import torch

    from model_store import ModelStore
    from toolkit.model.assemble import ModelSpec, build_classifier
    from toolkit.plugin.manager import load_plugins

    plugins = load_plugins(modules=[TINY_PLUGIN], env={})
    spec = ModelSpec("tiny:tiny-cnn", 3, backbone_options={"width": 4})
    model, backbone = build_classifier(plugins, spec, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        stem_conv, stem_bn = model.backbone[0][0], model.backbone[0][1]
        body_conv, body_bn = model.backbone[1][0], model.backbone[1][1]
        for c in range(3):  # channel c passes through both convs unchanged (centre tap)
            stem_conv.weight[c, c, 1, 1] = 1.0
            body_conv.weight[c, c, 1, 1] = 1.0
        for bn in (stem_bn, body_bn):  # identity batch norms
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
        head = model.head[-1]
        head.weight[:, :3] = torch.eye(3) * 4.0
    meta = {
        "spec": spec.to_dict(),
        "classes": list(classes),
        "data_config": backbone.data_config.to_dict(),
        "training": {"note": "hand-set weights for tests"},
        "metrics": {},
        "weights": backbone.weights.to_dict(),
        **(extra_meta or {}),
    }
    ModelStore(store_dir).save(name, model, meta)
    return name


@pytest.fixture
def colour_model(tmp_path: Path) -> tuple[Path, str]:
    """``(store_dir, name)`` of :func:`save_colour_model` in a fresh store."""
    store_dir = tmp_path / "store"
    return store_dir, save_colour_model(store_dir)


# -- pytest-xdist: a module's expensive fixtures are made once --------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` the tests of a module that use a module- or session-scoped
    fixture of its own that builds files (a trained model, a venv) run on one worker, so
    that fixture is made once instead of once per worker. Tests that already name a group
    (``torchrun``: one such job at a time) keep theirs."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        info = getattr(item, "_fixtureinfo", None)
        module = getattr(item, "module", None)
        if info is None or module is None:
            continue
        for defs in info.name2fixturedefs.values():
            fixture = defs[-1]
            if (fixture.scope in ("module", "session")
                    and "tmp_path_factory" in fixture.argnames  # it builds files
                    and getattr(fixture.func, "__module__", None) == module.__name__):
                item.add_marker(pytest.mark.xdist_group(module.__name__))
                break
