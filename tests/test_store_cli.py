"""`tk store ...` in real subprocesses against a temporary store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_store import ModelStore
from toolkit.model.assemble import ModelSpec, build_classifier
from toolkit.plugin.manager import load_plugins

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "plugins_for_tests" / "tiny.py")


def tk(*args: str, home: Path, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, TK_HOME=str(home / "default-store"), TORCH_HOME=str(home / "torch"),
               HF_HOME=str(home / "hf"), PYTHONPATH=str(REPO))
    env.pop("TK_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A store with two models sharing a base and one on its own."""
    root = tmp_path_factory.mktemp("cli") / "store"
    plugins = load_plugins(modules=[TINY], env={})
    store = ModelStore(root)
    torch.manual_seed(0)
    spec = ModelSpec("tiny:tiny-cnn", 2)
    model, backbone = build_classifier(plugins, spec)
    meta = {"spec": spec.to_dict(), "classes": ["circle", "square"],
            "data_config": backbone.data_config.to_dict(), "training": {"epochs": 2},
            "metrics": {"val_acc": 0.75}, "weights": backbone.weights.to_dict()}
    store.save("shapes-a", model.state_dict(), meta, shared_prefix="backbone.")
    store.save("shapes-b", model.state_dict(), meta, shared_prefix="backbone.")
    store.save("full", model.state_dict(), meta)
    return root


def test_list_show_verify(filled, tmp_path):
    out = tk("store", "list", "--store", str(filled), home=tmp_path).stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "CREATED", "BACKBONE"]
    assert [line.split()[0] for line in lines[1:]] == ["full", "shapes-b", "shapes-a"]
    assert "shared base" in out and "val_acc=0.75" in out

    data = json.loads(tk("store", "list", "--json", "--store", str(filled), home=tmp_path).stdout)
    assert [d["name"] for d in data] == ["full", "shapes-b", "shapes-a"]
    assert data[1]["base_ref"] == data[2]["base_ref"] and data[0]["base_ref"] is None
    assert data[0]["classes"] == ["circle", "square"]

    shown = json.loads(tk("store", "show", "shapes-a", "--json", "--store", str(filled),
                          home=tmp_path).stdout)
    assert shown["classes"] == ["circle", "square"]
    assert shown["spec"]["backbone"]["name"] == "tiny:tiny-cnn"
    assert shown["format_version"] == 1 and shown["file"]["base_present"] is True
    text = tk("store", "show", "shapes-a", "--store", str(filled), home=tmp_path).stdout
    assert "classes:" in text and "circle, square" in text and "shared base:" in text

    proc = tk("store", "verify", "--store", str(filled), home=tmp_path)
    assert proc.stdout.count("ok ") == 4  # three models and one base
    assert "all 4 file(s) ok" in proc.stderr


def test_errors_are_one_line(filled, tmp_path):
    proc = tk("store", "show", "shapes", "--store", str(filled), home=tmp_path, check_rc=2)
    assert proc.stderr.startswith("tk: error: no model 'shapes'")
    assert "did you mean" in proc.stderr and proc.stderr.count("\n") == 1
    proc = tk("store", "rm", "../x", "--store", str(filled), home=tmp_path, check_rc=2)
    assert "invalid model name" in proc.stderr
    proc = tk("store", "verify", "nope", "--store", str(filled), home=tmp_path, check_rc=2)
    assert "no model 'nope'" in proc.stderr


def test_verify_finds_a_flipped_byte_and_rm_collects(tmp_path, filled):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(filled, root)
    base = next((root / "bases").glob("*.safetensors"))
    data = bytearray(base.read_bytes())
    data[len(data) // 2] ^= 0x10
    base.write_bytes(bytes(data))
    proc = tk("store", "verify", "--store", str(root), home=tmp_path, check_rc=1)
    damaged = [line for line in proc.stdout.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 3  # both models on the base, and the base itself
    assert "3 of 4 file(s) damaged" in proc.stderr
    tk("store", "verify", "full", "--store", str(root), home=tmp_path)
    proc = tk("store", "verify", "shapes-a", "--store", str(root), home=tmp_path, check_rc=1)
    assert "base" in proc.stdout and "damaged" in proc.stdout

    tk("store", "rm", "shapes-a", "--store", str(root), home=tmp_path)
    assert base.exists()
    proc = tk("store", "rm", "shapes-b", "--store", str(root), home=tmp_path)
    assert not base.exists() and "removed shapes-b" in proc.stderr
    proc = tk("store", "verify", "--store", str(root), home=tmp_path)
    assert proc.stdout.split() == ["ok", "full"]


def test_default_store_is_tk_home(tmp_path):
    proc = tk("store", "list", home=tmp_path)
    assert proc.stdout == "" and f"no models in {tmp_path / 'default-store'}" in proc.stderr
    assert json.loads(tk("store", "list", "--json", home=tmp_path).stdout) == []


def test_import_weights(tmp_path):
    from toolkit.plugin.importing import _import

    torch.manual_seed(1)
    state = _import(TINY).tiny_cnn(False).module.state_dict()
    pth = tmp_path / "tiny.pth"
    torch.save(state, pth)
    store = tmp_path / "store"
    proc = tk("--plugin", TINY, "store", "import-weights", "tiny-cnn", str(pth),
              "--store", str(store), home=tmp_path)
    target = store / "weights" / "tiny" / "tiny-cnn.safetensors"
    assert proc.stdout.strip() == str(target)
    assert "imported weights for tiny:tiny-cnn" in proc.stderr
    loaded = ModelStore(store).load_weights("tiny:tiny-cnn")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    listed = json.loads(tk("store", "list", "--weights", "--json", "--store", str(store),
                           home=tmp_path).stdout)
    assert [w["backbone"] for w in listed] == ["tiny:tiny-cnn"]

    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1), "f": os.getcwd}, bad)  # a function: not weights
    proc = tk("--plugin", TINY, "store", "import-weights", "tiny-cnn", str(bad),
              "--store", str(store), home=tmp_path, check_rc=2)
    assert proc.stderr.startswith("tk: error: refused to import")
    assert proc.stderr.count("\n") == 1
    proc = tk("--plugin", TINY, "store", "import-weights", "tiny-cmn", str(pth),
              "--store", str(store), home=tmp_path, check_rc=2)
    assert "tiny-cnn" in proc.stderr  # did-you-mean from the registry
