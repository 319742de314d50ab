"""`tk store ...` in real subprocesses against a temporary store."""

from __future__ import annotations

import json
import os
import re
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
    other, _ = build_classifier(plugins, spec)
    with torch.no_grad():  # nothing in common with the others, so nothing shared
        for t in other.state_dict().values():
            if t.is_floating_point():
                t.uniform_(-1, 1)
    store.save("full", other.state_dict(), meta)
    return root


def test_list_show_verify(filled, tmp_path):
    proc = tk("store", "list", "--store", str(filled), home=tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "CREATED", "BACKBONE"]
    assert [line.split()[0] for line in lines[1:]] == ["full", "shapes-b", "shapes-a"]
    assert re.search(r"^shapes-a .* \d+\.\d KB \(\+\d+\.\d KB shared\) +val_acc=0\.75$",
                     proc.stdout, re.M)
    assert "shared" not in lines[1]
    # the footer adds up what is really on disk, each blob once
    total = sum(p.stat().st_size for p in filled.rglob("*") if p.is_file())
    footer = proc.stderr.strip()
    assert footer.startswith("3 model(s); on disk ") and footer.count("\n") == 0
    blob = next((filled / "bases").iterdir()).stat().st_size
    assert f"shared blobs {blob / 1000:.1f} KB" in footer
    assert f"on disk {total / 1000:.1f} KB" in footer

    data = json.loads(tk("store", "list", "--json", "--store", str(filled), home=tmp_path).stdout)
    assert [d["name"] for d in data] == ["full", "shapes-b", "shapes-a"]
    assert data[1]["blobs"] == data[2]["blobs"] and data[0]["blobs"] == []
    assert data[1]["base_ref"] == data[2]["base_ref"] and data[0]["base_ref"] is None
    assert data[2]["shared_bytes"] > 0 and data[2]["format_version"] == 2
    assert data[0]["classes"] == ["circle", "square"]

    shown = json.loads(tk("store", "show", "shapes-a", "--json", "--store", str(filled),
                          home=tmp_path).stdout)
    assert shown["classes"] == ["circle", "square"]
    assert shown["spec"]["backbone"]["name"] == "tiny:tiny-cnn"
    assert shown["format_version"] == 2 and shown["file"]["base_present"] is True
    [b] = shown["file"]["blobs"]
    assert b["sha256"] == data[2]["blobs"][0] and b["used_bytes"] == data[2]["shared_bytes"]
    text = tk("store", "show", "shapes-a", "--store", str(filled), home=tmp_path).stdout
    assert "classes:" in text and "circle, square" in text
    assert re.search(r"^shared: +\d+\.\d KB in \d+ tensor\(s\) of .*bases/", text, re.M)

    proc = tk("store", "verify", "--store", str(filled), home=tmp_path)
    assert proc.stdout.count("ok ") == 4  # three models and one blob
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
    assert len(damaged) == 3  # both models on the blob, and the blob itself
    assert "3 of 4 file(s) damaged" in proc.stderr
    tk("store", "verify", "full", "--store", str(root), home=tmp_path)
    proc = tk("store", "verify", "shapes-a", "--store", str(root), home=tmp_path, check_rc=1)
    assert "blob" in proc.stdout and "damaged" in proc.stdout

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
    target = ModelStore(store).find_weights("tiny:tiny-cnn")
    assert target.parent == store / "bases" and proc.stdout.strip() == str(target)
    assert re.fullmatch(r"imported weights for tiny:tiny-cnn \(14 tensors, \d+\.\d KB\)\n",
                        proc.stderr)
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


def test_a_fifo_in_the_store_hangs_nothing(tmp_path):
    """A FIFO named like a model: `store list`, `verify`, `rm` and `tk infer` with the
    default model answer at once (a hang fails on the subprocess timeout)."""
    from conftest import TINY_PLUGIN, save_colour_model, write_image

    store = tmp_path / "store"
    save_colour_model(store, "colours")
    os.mkfifo(store / "models" / "zz-pipe.safetensors")
    proc = tk("store", "list", "--store", str(store), home=tmp_path)
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:]] == ["colours"]
    assert "tk: warning: model 'zz-pipe'" in proc.stderr and "is a FIFO" in proc.stderr
    proc = tk("store", "verify", "--store", str(store), home=tmp_path, check_rc=1)
    assert "DAMAGED  zz-pipe:" in proc.stdout and "ok       colours" in proc.stdout
    image = write_image(tmp_path / "red.png", colour=(250, 10, 10))
    proc = tk("--plugin", TINY_PLUGIN, "infer", str(image), "--format", "jsonl",
              "--store", str(store), home=tmp_path)
    assert json.loads(proc.stdout)["label"] == "red"
    proc = tk("store", "show", "zz-pipe", "--store", str(store), home=tmp_path, check_rc=2)
    assert proc.stderr.count("\n") == 1 and "is a FIFO, not a model file" in proc.stderr
    proc = tk("store", "rm", "zz-pipe", "--store", str(store), home=tmp_path)
    assert "removed zz-pipe (0 B freed)" in proc.stderr


def test_rm_of_a_symlinked_model_says_what_it_kept(tmp_path, filled):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(filled, root)
    model = root / "models" / "full.safetensors"
    target = tmp_path / "kept-elsewhere.safetensors"
    model.rename(target)
    model.symlink_to(target)
    proc = tk("store", "rm", "full", "--store", str(root), home=tmp_path)
    assert proc.stderr == (f"removed full (0 B freed; the file it links to, {target}, "
                           "is kept)\n")
    assert target.exists() and not os.path.lexists(model)


def test_reimport_through_the_cli_keeps_the_model_on_the_old_weights(tmp_path):
    """import-weights, a model on them, import-weights again: the model still loads
    bit for bit, verify is clean, and only the blob nobody uses any more goes away."""
    from toolkit.model.loading import load_model
    from toolkit.plugin.importing import _import

    store = tmp_path / "store"
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        files.append(tmp_path / f"w{seed}.pth")
        torch.save(_import(TINY).tiny_cnn(False).module.state_dict(), files[-1])
    tk("--plugin", TINY, "store", "import-weights", "tiny-cnn", str(files[0]),
       "--store", str(store), home=tmp_path)
    plugins = load_plugins(modules=[TINY], env={})
    ms = ModelStore(store)
    spec = ModelSpec("tiny:tiny-cnn", 2)
    model, backbone = build_classifier(plugins, spec, pretrained=str(ms.find_weights("tiny-cnn")))
    meta = {"spec": spec.to_dict(), "classes": ["a", "b"],
            "data_config": backbone.data_config.to_dict(), "training": {}, "metrics": {},
            "weights": backbone.weights.to_dict()}
    ms.save("on-w1", model, meta, shared_prefix="backbone.")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    first = ms.find_weights("tiny-cnn")
    tk("--plugin", TINY, "store", "import-weights", "tiny-cnn", str(files[1]),
       "--store", str(store), home=tmp_path)
    assert first.exists() and ms.find_weights("tiny-cnn") != first
    proc = tk("store", "verify", "--store", str(store), home=tmp_path)
    assert "all 4 file(s) ok" in proc.stderr  # the model, two blobs, the pointer
    with torch.no_grad():
        assert torch.equal(load_model("on-w1", store, plugins=plugins).model(x), expected)
    tk("store", "rm", "on-w1", "--store", str(store), home=tmp_path)
    assert not first.exists() and len(list((store / "bases").iterdir())) == 1
