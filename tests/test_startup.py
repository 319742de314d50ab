"""Start-up: registering backbones imports neither timm nor torchvision (their name lists are
cached per installed version), so a command imports only what its model needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.plugin import namecache
from toolkit.testing import isolated_env

REPO = Path(__file__).resolve().parent.parent


def _tk(args: list[str], env: dict[str, str], *, importtime: bool = False
        ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "toolkit", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _imported(stderr: str) -> set[str]:
    """Top-level packages named in ``-X importtime`` output."""
    out = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            out.add(name.split(".")[0])
    return out


@pytest.mark.slow
def test_a_torchvision_model_never_imports_timm(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, {"OMP_NUM_THREADS": "1"})
    warm = _tk(["list", "backbones", "resnet1*"], env)  # fills the name cache
    assert warm.returncode == 0, warm.stderr
    assert "torchvision" in warm.stdout and "timm" in warm.stdout  # both plugins listed
    train = _tk(["finetune", "--backbone", "alexnet", "--classes", "3", "--no-pretrained",
                 "--epochs", "1", "--name", "a", "--image-size", "64", "-q",
                 "--opt", "dataset.samples=60"], env, importtime=True)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "timm" not in _imported(train.stderr)
    image = tmp_path / "one.png"
    from PIL import Image

    Image.new("RGB", (80, 80), (200, 10, 10)).save(image)
    infer = _tk(["infer", str(image), "--model", "a", "--format", "jsonl"], env,
                importtime=True)
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert json.loads(infer.stdout)["label"] in {"circle", "triangle", "square"}
    imported = _imported(infer.stderr)
    assert "timm" not in imported and "torchvision" in imported


def test_the_cached_list_is_the_computed_one_and_keyed_by_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[int] = []

    def compute() -> list[namecache.Entry]:
        calls.append(1)
        return [("net-a", {"description": "a"}), ("net-b", {"fallback": True})]

    monkeypatch.setattr(namecache, "library_version", lambda dist: "1.0")
    first = namecache.cached_entries("lib", "somelib", 1, compute)
    again = namecache.cached_entries("lib", "somelib", 1, compute)
    assert first == again and len(calls) == 1  # computed once, then read
    monkeypatch.setattr(namecache, "library_version", lambda dist: "2.0")  # upgraded
    namecache.cached_entries("lib", "somelib", 1, compute)
    assert len(calls) == 2
    files = sorted(p.name for p in (tmp_path / "tk" / "names").iterdir())
    assert files == ["lib-somelib-1.0-v1.json", "lib-somelib-2.0-v1.json"]


@pytest.mark.parametrize("damage", ["garbage", "wrong-shape", "folder"])
def test_a_damaged_cache_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       damage: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(namecache, "library_version", lambda dist: "1.0")
    path = tmp_path / "tk" / "names" / "lib-somelib-1.0-v1.json"
    path.parent.mkdir(parents=True)
    if damage == "garbage":
        path.write_bytes(b"\x00{not json")
    elif damage == "wrong-shape":
        path.write_text(json.dumps({"net": 1}))
    else:
        path.mkdir()
    entries = namecache.cached_entries("lib", "somelib", 1, lambda: [("net", {})])
    assert entries == [("net", {})]


def test_an_unwritable_cache_costs_only_the_recomputation(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(namecache, "library_version", lambda dist: "1.0")
    assert namecache.cached_entries("lib", "somelib", 1, lambda: [("n", {})]) == [("n", {})]


def test_the_builtin_lists_are_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What registration reads from the cache is exactly what the libraries list."""
    from plugins import timm_backbones, torchvision_backbones

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for module, dist in ((torchvision_backbones, "torchvision"), (timm_backbones, "timm")):
        fresh = module._entries()
        names: list[str] = []
        module.tk_register_backbones(lambda name, factory, _n=names, **info: _n.append(name))
        cached = namecache.cached_entries(module.OWNER, dist, module.NAMES_FORMAT,
                                          lambda: pytest.fail("not cached"))
        assert [n for n, _ in fresh] == names == [n for n, _ in cached]
        assert [i for _, i in fresh] == [i for _, i in cached]
