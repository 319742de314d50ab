"""The model store through its Python API, on real safetensors files and real processes."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from model_store import ModelStore, default_store_path
from model_store.fileformat import seal, serialize, sha256_file
from toolkit.errors import StoreError
from toolkit.model.assemble import ModelSpec, build_classifier
from toolkit.model.loading import load_model
from toolkit.model.weights import import_weights
from toolkit.plugin.manager import load_plugins

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "plugins_for_tests" / "tiny.py")


@pytest.fixture(scope="module")
def plugins():
    return load_plugins(modules=[TINY], env={})


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def tiny_model(plugins, classes=("cat", "dog", "fish"), seed=0, width=8):
    torch.manual_seed(seed)
    spec = ModelSpec("tiny:tiny-cnn", len(classes), backbone_options={"width": width})
    model, backbone = build_classifier(plugins, spec, pretrained=False)
    model.eval()
    meta = {
        "spec": spec.to_dict(),
        "classes": list(classes),
        "data_config": backbone.data_config.to_dict(),
        "training": {"epochs": 1, "lr": 1e-3, "freeze": "all"},
        "metrics": {"val_acc": 0.5, "val_loss": 1.25, "history": [{"epoch": 1}]},
        "weights": backbone.weights.to_dict(),
        "tk_version": "0.1.0",  # what toolkit's finetune records (the store takes it as given)
    }
    return model, meta


def images(n=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


class Flipper:
    """Flip single bytes of a file in place (and back), keeping one descriptor open."""

    def __init__(self, path: Path):
        self.original = path.read_bytes()
        self.fd = os.open(path, os.O_RDWR)

    def flip(self, offset: int, mask: int) -> None:
        os.pwrite(self.fd, bytes([self.original[offset] ^ mask]), offset)

    def restore(self, offset: int) -> None:
        os.pwrite(self.fd, self.original[offset : offset + 1], offset)

    def close(self) -> None:
        os.close(self.fd)


def header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# -- round trip ------------------------------------------------------------------------

def test_round_trip_gives_bit_identical_logits(store, plugins):
    model, meta = tiny_model(plugins)
    x = images()
    with torch.no_grad():
        before = model(x)
    info = store.save("tiny", model.state_dict(), meta)
    assert info.name == "tiny" and info.path == store.model_path("tiny")
    assert info.path.is_file() and info.size_bytes == info.path.stat().st_size
    assert info.base_ref is None and info.metrics == {"val_acc": 0.5, "val_loss": 1.25}

    loaded = load_model("tiny", store, plugins=plugins)
    assert not loaded.model.training
    with torch.no_grad():
        after = loaded.model(x)
    assert torch.equal(before, after)
    assert loaded.classes == ["cat", "dog", "fish"]
    assert loaded.spec == ModelSpec.from_dict(meta["spec"])
    assert loaded.data_config.input_size == (3, 32, 32)
    for key in ("format_version", "name", "tk_version", "created", "training", "weights"):
        assert key in loaded.meta
    assert loaded.meta["training"]["freeze"] == "all"
    assert loaded.meta["metrics"]["history"] == [{"epoch": 1}]


def test_save_accepts_a_module_and_moves_to_device(store, plugins):
    model, meta = tiny_model(plugins)
    store.save("m", model, meta)
    loaded = load_model("m", store, plugins=plugins, device=torch.device("cpu"))
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_shared_base_is_stored_once_and_both_models_load(store, plugins, capsys):
    model_a, meta = tiny_model(plugins, seed=0)
    model_b, _ = tiny_model(plugins, seed=0)
    torch.manual_seed(5)
    model_b.head.reset_parameters() if hasattr(model_b.head, "reset_parameters") else [
        m.reset_parameters() for m in model_b.head.modules() if hasattr(m, "reset_parameters")]
    x = images()
    with torch.no_grad():
        la, lb = model_a(x), model_b(x)
    assert not torch.equal(la, lb)
    ia = store.save("a", model_a.state_dict(), meta, shared_prefix="backbone.")
    ib = store.save("b", model_b.state_dict(), meta, shared_prefix="backbone.")
    assert ia.base_ref == ib.base_ref and ia.base_ref is not None
    bases = list((store.root / "bases").glob("*.safetensors"))
    assert [p.name for p in bases] == [f"{ia.base_ref}.safetensors"]
    full = sum(t.numel() * t.element_size() for t in model_a.state_dict().values())
    with capsys.disabled():
        print(f"\n[store sizes, tiny-cnn] tensors {full} B; base {bases[0].stat().st_size} B; "
              f"model files {ia.size_bytes} B and {ib.size_bytes} B")
    assert ia.size_bytes < bases[0].stat().st_size
    with torch.no_grad():
        assert torch.equal(load_model("a", store, plugins=plugins).model(x), la)
        assert torch.equal(load_model("b", store, plugins=plugins).model(x), lb)
    assert [i.name for i in store.list()] == ["b", "a"]
    assert store.info("a").base_size_bytes == bases[0].stat().st_size


def randomised(model):
    """Every float tensor random (no all-ones BatchNorm weights shared by chance)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    return model


def test_remove_garbage_collects_unreferenced_blobs(store, plugins):
    model, meta = tiny_model(plugins, seed=0)
    other, _ = tiny_model(plugins, seed=1)
    a = store.save("a", model.state_dict(), meta, shared_prefix="backbone.")
    b = store.save("b", model.state_dict(), meta, shared_prefix="backbone.")
    c = store.save("c", other.state_dict(), meta, shared_prefix="backbone.")
    assert a.blobs == b.blobs and len(a.blobs) == 1
    # c shares a few all-ones BatchNorm tensors with a's blob, too few to pin it: own blob
    assert c.blobs and set(c.blobs).isdisjoint(a.blobs)
    blob_a, blob_c = store.base_path(a.base_ref), store.base_path(c.base_ref)
    done = store.remove("a")
    assert done.freed_bytes == a.size_bytes and blob_a.exists()  # still used by b
    assert done.kept is None and done.blobs_removed == 0
    blob_a_size = blob_a.stat().st_size
    done = store.remove("b")
    assert not blob_a.exists() and blob_c.exists()
    assert done.freed_bytes == b.size_bytes + blob_a_size and done.blobs_removed == 1
    # overwriting c with a model on other weights drops c's old blob
    store.save("c", model.state_dict(), meta, shared_prefix="backbone.", overwrite=True)
    assert not blob_c.exists()
    assert [i.name for i in store.list()] == ["c"]
    with pytest.raises(StoreError, match="no model 'a'"):
        store.remove("a")


def test_existing_name_needs_overwrite(store, plugins):
    model, meta = tiny_model(plugins)
    first = store.save("m", model.state_dict(), meta)
    with pytest.raises(StoreError, match="model 'm' exists; use --overwrite"):
        store.save("m", model.state_dict(), meta)
    assert store.info("m").created == first.created
    meta2 = dict(meta, metrics={"val_acc": 0.9})
    second = store.save("m", model.state_dict(), meta2, overwrite=True)
    assert store.info("m").metrics == {"val_acc": 0.9} and second.created >= first.created


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 200, "a b", "a\\b",
                                  "..", "nul\0"])
def test_bad_names_are_refused(store, plugins, name):
    model, meta = tiny_model(plugins)
    with pytest.raises(StoreError, match="invalid model name"):
        store.save(name, model.state_dict(), meta)
    with pytest.raises(StoreError, match="invalid model name"):
        load_model(name, store, plugins=plugins)
    assert not store.root.exists() or not any(store.root.rglob("*.safetensors"))


def test_list_newest_info_show(store, plugins):
    assert store.list() == [] and store.newest() is None
    model, meta = tiny_model(plugins)
    store.save("old", model.state_dict(), meta)
    store.save("new", model.state_dict(), meta, shared_prefix="backbone.")
    assert [i.name for i in store.list()] == ["new", "old"]
    assert store.newest().name == "new"
    info = store.info("new")
    assert info.backbone == "tiny:tiny-cnn" and info.head == "linear"
    assert info.classes == ["cat", "dog", "fish"]
    shown = store.show("new")
    assert shown["classes"] == ["cat", "dog", "fish"]
    assert shown["spec"]["backbone"]["options"] == {"width": 8}
    assert re.fullmatch(r"[0-9a-f]{64}", shown["file"]["sha256"])
    assert shown["file"]["base_present"] is True
    assert json.dumps(shown)  # JSON-able as `tk store show --json` prints it
    with pytest.raises(StoreError, match="did you mean 'new'"):
        store.info("neww")


def test_default_store_path(monkeypatch, tmp_path):
    assert default_store_path({"TK_HOME": str(tmp_path)}) == tmp_path
    assert default_store_path({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "tk"
    assert default_store_path({}) == Path.home() / ".local" / "share" / "tk"
    monkeypatch.setenv("TK_HOME", str(tmp_path / "h"))
    assert ModelStore().root == tmp_path / "h"


# -- integrity ---------------------------------------------------------------------------

def test_every_flipped_byte_in_a_model_file_is_caught(store, plugins):
    model, meta = tiny_model(plugins)
    info = store.save("m", model.state_dict(), meta, shared_prefix="backbone.")
    path = info.path
    assert all(r.ok for r in store.verify())
    hl = header_len(path)
    flipper = Flipper(path)
    size = len(flipper.original)
    for offset in range(size):
        # every byte with its low bit flipped; header bytes also pushed out of ASCII
        for mask in (0x01, 0x80) if offset < hl else (0x01,):
            flipper.flip(offset, mask)
            [result] = store.verify("m")
            assert not result.ok, f"flip at {offset} (header ends at {hl}) not caught"
            assert result.problem
            if offset % 29 == 0 or offset in (0, 7, 8, hl - 1, hl, size - 1):
                with pytest.raises(StoreError, match="model 'm'"):
                    load_model("m", store, plugins=plugins)
            flipper.restore(offset)
    flipper.close()
    assert store.verify("m")[0].ok
    load_model("m", store, plugins=plugins)


def test_flipped_byte_in_data_gives_clear_errors(store, plugins):
    model, meta = tiny_model(plugins)
    info = store.save("m", model.state_dict(), meta)
    flip(info.path, info.size_bytes - 3)
    [result] = store.verify("m")
    assert not result.ok and "checksum mismatch" in result.problem
    with pytest.raises(StoreError, match=r"model 'm' is damaged .*checksum mismatch"):
        load_model("m", store, plugins=plugins)
    assert [i.name for i in store.list()] == ["m"]  # list reads headers only; verify finds it


def test_every_flipped_byte_in_a_base_is_caught(store, plugins):
    model, meta = tiny_model(plugins)
    info = store.save("m", model.state_dict(), meta, shared_prefix="backbone.")
    base = store.base_path(info.base_ref)
    hl = header_len(base)
    flipper = Flipper(base)
    size = len(flipper.original)
    for offset in [*range(hl), *range(hl, size, 7), size - 1]:
        flipper.flip(offset, 0x01)
        [result] = store.verify("m")
        assert not result.ok and "damaged" in result.problem
        if offset % 97 == 0:
            problems = {r.name: r.problem for r in store.verify() if not r.ok}
            assert set(problems) == {"m", f"blob:{info.base_ref[:12]}"}
            with pytest.raises(StoreError, match=r"shared weights .* are damaged"):
                load_model("m", store, plugins=plugins)
        flipper.restore(offset)
    flipper.close()
    assert store.verify("m")[0].ok
    base.unlink()
    assert "missing" in store.verify("m")[0].problem
    with pytest.raises(StoreError, match="shared weights .* are missing"):
        load_model("m", store, plugins=plugins)
    # saving again on the same weights repairs the store
    store.save("m2", model.state_dict(), meta, shared_prefix="backbone.")
    assert all(r.ok for r in store.verify())


def _write_with_meta(store: ModelStore, name: str, tk_value: str | None, plugins) -> None:
    """A file with a valid checksum but the given metadata (as a careful hand edit would
    produce): only the metadata checks stand between it and torch."""
    model, _ = tiny_model(plugins)
    extra = {} if tk_value is None else {"tk": tk_value}
    chunks, _ = seal(serialize(model.state_dict(), extra))
    path = store.model_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(c) for c in chunks))


def _good_meta(plugins) -> dict:
    _, meta = tiny_model(plugins)
    meta = json.loads(json.dumps(meta))
    meta.update(format_version=1, name="x", tk_version="0", created="2024-01-01T00:00:00+00:00",
                base=None)
    return meta


BAD_METADATA = {
    "not json": ("{not json", "not valid JSON"),
    "a list": ("[1, 2]", "not an object"),
    "no tk key": (None, "no tk metadata"),
    "missing classes": (lambda m: m.pop("classes"), "missing key.*classes"),
    "classes not list": (lambda m: m.update(classes="cat,dog,fish"), "'classes'"),
    "class count": (lambda m: m.update(classes=["a", "b"]), "2 class names for 3"),
    "num_classes str": (lambda m: m["spec"].update(num_classes="3"), "num_classes"),
    "backbone name int": (lambda m: m["spec"]["backbone"].update(name=7), "spec.backbone.name"),
    "options not dict": (lambda m: m["spec"]["head"].update(options=[1]), "spec.head.options"),
    "std zero": (lambda m: m["data_config"].update(std=[0, 1, 1]), "std"),
    "input size": (lambda m: m["data_config"].update(input_size=[3, -1, 32]), "input_size"),
    "future format": (lambda m: m.update(format_version=99), "newer than this tk"),
    "format missing": (lambda m: m.pop("format_version"), "format_version"),
    "bad created": (lambda m: m.update(created="yesterday"), "created"),
    "bad base": (lambda m: m.update(base={"sha256": "../../etc", "prefix": "b."}),
                 "base.sha256"),
    "bad shared blob": (lambda m: m.update(shared={"blobs": [{"sha256": "../x"}],
                                                   "tensors": {"a": [0, "a"]}}),
                        "shared.blobs"),
    "shared index": (lambda m: m.update(shared={"blobs": [{"sha256": "0" * 64}],
                                                "tensors": {"a": [1, "a"]}}),
                     "shared.tensors"),
    "training str": (lambda m: m.update(training="x"), "'training'"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_hand_edited_metadata_gives_one_line_store_error(store, plugins, case):
    edit, pattern = BAD_METADATA[case]
    if callable(edit):
        meta = _good_meta(plugins)
        edit(meta)
        value = json.dumps(meta)
    else:
        value = edit
    _write_with_meta(store, "edited", value, plugins)
    with pytest.raises(StoreError, match=pattern) as err:
        load_model("edited", store, plugins=plugins)
    assert "\n" not in str(err.value) and "model 'edited'" in str(err.value)
    assert store.list() == []
    assert [d.name for d in store.damaged()] == ["edited"]
    [result] = store.verify("edited")
    assert not result.ok and re.search(pattern, result.problem)


def test_unknown_component_in_metadata_is_resolved_through_the_registry_only(store, plugins):
    meta = _good_meta(plugins)
    meta["spec"]["backbone"]["name"] = "os:system"
    _write_with_meta(store, "m", json.dumps(meta), plugins)
    with pytest.raises(StoreError, match="cannot rebuild model 'm'.*os:system"):
        load_model("m", store, plugins=plugins)


def test_tensors_that_do_not_fit_the_architecture(store, plugins):
    model, meta = tiny_model(plugins, width=8)
    meta["spec"]["backbone"]["options"] = {"width": 4}
    store.save("m", model.state_dict(), meta)
    with pytest.raises(StoreError, match="does not fit its architecture.*wrong shape"):
        load_model("m", store, plugins=plugins)
    state = model.state_dict()
    state.pop("head.0.weight")
    _, meta = tiny_model(plugins)
    store.save("n", state, meta)
    with pytest.raises(StoreError, match="missing: head.0.weight"):
        load_model("n", store, plugins=plugins)


def test_text_editor_edit_breaks_the_checksum(store, plugins):
    model, meta = tiny_model(plugins)
    info = store.save("m", model.state_dict(), meta)
    data = info.path.read_bytes()
    assert data.count(b"fish") == 1
    info.path.write_bytes(data.replace(b"fish", b"bird"))
    with pytest.raises(StoreError, match="checksum mismatch"):
        load_model("m", store, plugins=plugins)


def test_save_validates_metadata_before_writing(store, plugins):
    model, meta = tiny_model(plugins)
    bad = [dict(meta, classes=["a"]), {k: v for k, v in meta.items() if k != "spec"},
           dict(meta, training={"fn": object()}), "not a dict"]
    for m in bad:
        with pytest.raises(StoreError, match="cannot save model|not JSON"):
            store.save("m", model.state_dict(), m)
    with pytest.raises(StoreError, match="not a tensor"):
        store.save("m", {"head.weight": [1, 2]}, meta)
    with pytest.raises(StoreError, match="no tensor name starts with"):
        store.save("m", model.state_dict(), meta, shared_prefix="nothing.")
    assert store.list() == [] and not store.model_path("m").exists()


# -- atomicity ---------------------------------------------------------------------------

KILL_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from model_store import ModelStore
    real_fsync = os.fsync
    def slow_fsync(fd):  # widen the window between "data written" and "renamed"
        time.sleep(0.15)
        real_fsync(fd)
    os.fsync = slow_fsync
    store = ModelStore(sys.argv[1])
    meta = {"spec": {"backbone": {"name": "tiny:tiny-cnn", "options": {}},
                     "head": {"name": "linear", "options": {}}, "num_classes": 2},
            "classes": ["a", "b"], "training": {}, "metrics": {}, "weights": {},
            "data_config": {"input_size": [3, 32, 32], "mean": [0, 0, 0], "std": [1, 1, 1]}}
    i = 0
    while True:
        state = {"backbone.w": torch.full((4_000_000,), float(i)),  # 16 MB, new base each time
                 "head.w": torch.randn(4_000_000)}
        store.save(f"m{i}", state, meta, shared_prefix="backbone.")
        i += 1
""")


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tk-tmp-*")]


@pytest.mark.parametrize("wait_for", ["bases", "models"])
def test_kill_during_save_leaves_no_half_model(tmp_path, plugins, wait_for):
    root = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(REPO), TK_HOME=str(tmp_path / "home"))
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(root)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            done = list((root / "models").glob("m*.safetensors"))
            if done and list((root / wait_for).glob(".tk-tmp-*")):
                break
            time.sleep(0.005)
        assert child.poll() is None, "the saving process died on its own"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    leftovers = _temps(root)
    assert leftovers, "the kill should have left a temp file behind"

    store = ModelStore(root)
    listed = store.list()
    files = sorted(p.name for p in (root / "models").iterdir() if p.name.endswith(".safetensors")
                   and not p.name.startswith("."))
    assert sorted(f"{i.name}.safetensors" for i in listed) == files
    assert listed, "models saved before the kill are listed"
    results = store.verify()
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]
    assert store.damaged() == []

    model, meta = tiny_model(plugins)
    store.save("after", model.state_dict(), meta, shared_prefix="backbone.")
    assert _temps(root) == []  # the next writer cleans up after the dead one
    store.gc()
    referenced = {i.base_ref for i in store.list()}
    assert {p.name.split(".")[0] for p in (root / "bases").glob("*.safetensors")} == referenced
    assert load_model("after", store, plugins=plugins).classes == ["cat", "dog", "fish"]


def test_temp_files_of_live_writers_are_left_alone(store, plugins):
    from model_store.atomic import clean_stale_temps

    model, meta = tiny_model(plugins)
    store.save("m", model.state_dict(), meta)
    mine = store.models_dir / f".tk-tmp-{os.getpid()}-abcd-x.safetensors"
    dead = store.models_dir / ".tk-tmp-999999999-abcd-y.safetensors"
    for p in (mine, dead):
        p.write_bytes(b"partial")
    assert [i.name for i in store.list()] == ["m"]
    assert clean_stale_temps(store.models_dir) == [dead]
    assert mine.exists()


def test_unwritable_store_gives_store_error(tmp_path, plugins):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model, meta = tiny_model(plugins)
    for root in (blocker, blocker / "store"):
        with pytest.raises(StoreError, match="cannot (create|use) model store"):
            ModelStore(root).save("m", model.state_dict(), meta)
    with pytest.raises(StoreError, match="cannot read model store .*Not a directory"):
        ModelStore(blocker / "store").list()


def test_full_disk_leaves_nothing_partial(store, plugins, monkeypatch):
    model, meta = tiny_model(plugins)
    store.save("keep", model.state_dict(), meta)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreError, match="cannot write .*no space left on device"):
        store.save("m", model.state_dict(), meta, shared_prefix="backbone.")
    monkeypatch.undo()
    assert [i.name for i in store.list()] == ["keep"]
    assert _temps(store.root) == []
    assert not list(store.bases_dir.glob("*.safetensors"))


# -- imported weights --------------------------------------------------------------------

@pytest.fixture
def tiny_backbone_state():
    torch.manual_seed(3)
    from toolkit.plugin.importing import _import

    module = _import(TINY)
    return module.tiny_cnn(False).module.state_dict()


def test_import_weights_pth(store, tmp_path, tiny_backbone_state):
    pth = tmp_path / "tiny.pth"
    torch.save(tiny_backbone_state, pth)
    path = import_weights(store, "tiny:tiny-cnn", pth)
    # the tensors are one blob, named by its sha256; a small pointer keeps the provenance
    assert path.parent == store.bases_dir and path.name == f"{sha256_file(path)}.safetensors"
    pointer = store.root / "weights" / "tiny" / "tiny-cnn.json"
    assert json.loads(pointer.read_text())["blob"] == path.name.split(".")[0]
    assert store.find_weights("tiny:tiny-cnn") == path
    assert store.find_weights("tiny-cnn") == path  # bare name, imported under one plugin
    assert store.find_weights("other:tiny-cnn") is None
    loaded = store.load_weights("tiny:tiny-cnn")
    assert loaded.keys() == tiny_backbone_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_backbone_state.items())
    info = store.weights_info("tiny:tiny-cnn")
    assert info["source_name"] == "tiny.pth" and info["backbone"] == "tiny:tiny-cnn"
    assert info["source_sha256"] == sha256_file(pth) and info["path"] == str(path)
    assert [w["backbone"] for w in store.list_weights()] == ["tiny:tiny-cnn"]
    # what a backbone factory does with the found file: plain safetensors
    from safetensors.torch import load_file

    assert load_file(str(path)).keys() == tiny_backbone_state.keys()
    assert all(r.ok for r in store.verify())
    flip(path, path.stat().st_size - 1)
    assert not store.verify()[0].ok
    with pytest.raises(StoreError, match="damaged"):
        store.load_weights("tiny:tiny-cnn")


def test_import_weights_safetensors_and_wrapped_pth(store, tmp_path, tiny_backbone_state):
    from safetensors.torch import save_file

    src = tmp_path / "w.safetensors"
    save_file(tiny_backbone_state, str(src), metadata={"format": "pt"})
    path = import_weights(store, "tiny:tiny-cnn", src)
    loaded = store.load_weights("tiny:tiny-cnn")
    assert all(torch.equal(loaded[k], v) for k, v in tiny_backbone_state.items())
    assert store.weights_info("tiny:tiny-cnn")["source_metadata"] == {"format": "pt"}
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": tiny_backbone_state, "epoch": 3}, wrapped)
    # replaces the earlier import; the same tensors are the same blob, stored once
    assert import_weights(store, "tiny:tiny-cnn", wrapped) == path
    assert store.weights_info("tiny:tiny-cnn")["source_name"] == "ckpt.pth"
    assert list(store.bases_dir.iterdir()) == [path]


class Evil:
    """Unpickling this would create a directory: weights_only must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_import_refuses_pickled_objects(store, tmp_path, tiny_backbone_state):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({**tiny_backbone_state, "x": Evil(str(marker))}, evil)
    with pytest.raises(StoreError, match=r"refused to import .*pickled Python object "
                       r"\(posix.mkdir\)"):
        import_weights(store, "tiny:tiny-cnn", evil)
    assert not marker.exists()
    assert store.find_weights("tiny:tiny-cnn") is None


def test_import_rejects_bad_files(store, tmp_path):
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(os.urandom(256))
    not_pth = tmp_path / "g.pth"
    not_pth.write_bytes(b"nope")
    for f, pattern in ((garbage, "not a valid safetensors"), (not_pth, "cannot read"),
                       (tmp_path / "w.txt", "not found"), (tmp_path / "missing.pth", "not found")):
        with pytest.raises(StoreError, match=pattern):
            import_weights(store, "tiny:tiny-cnn", f)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(StoreError, match="expected a .safetensors or .pth"):
        import_weights(store, "tiny:tiny-cnn", tmp_path / "w.txt")
    with pytest.raises(StoreError, match="qualified backbone name"):
        import_weights(store, "tiny-cnn", garbage)
    with pytest.raises(StoreError, match="invalid"):
        import_weights(store, "../x:y", garbage)


def test_no_pickle_on_any_load_path():
    """Source check: the store never unpickles (torch.load only with weights_only=True)."""
    sources = {p.name: p.read_text() for p in (REPO / "model_store").glob("*.py")}
    for name, text in sources.items():
        assert not re.search(r"pickle\.loads?\(|import dill|marshal\.loads?", text), name
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (name, call)


# -- each tensor once ---------------------------------------------------------------------

def _own_keys(path: Path) -> set[str]:
    from model_store.fileformat import read_header, tensor_names

    return set(tensor_names(read_header(path)))


def _new_head(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in model.head.state_dict().values():
            t.normal_()
    return model


def _backbone_file(model, path: Path) -> Path:
    torch.save({k[len("backbone."):]: v.clone() for k, v in model.state_dict().items()
                if k.startswith("backbone.")}, path)
    return path


def test_frozen_models_on_imported_weights_add_no_blob(store, plugins, tmp_path):
    model, meta = tiny_model(plugins, width=16)
    randomised(model)
    blob = import_weights(store, "tiny:tiny-cnn", _backbone_file(model, tmp_path / "w.pth"))
    before = store.usage()["total"]
    x, saved, logits = images(), [], []
    for i in range(2):
        _new_head(model, seed=10 + i)
        with torch.no_grad():
            logits.append(model(x))
        saved.append(store.save(f"m{i}", model.state_dict(), meta, shared_prefix="backbone."))
    assert list(store.bases_dir.iterdir()) == [blob]  # no second copy of the backbone
    assert all(i.blobs == [blob.name.split(".")[0]] for i in saved)
    assert store.usage()["total"] - before == sum(i.size_bytes for i in saved)
    assert _own_keys(saved[0].path) == {k for k in model.state_dict() if k.startswith("head.")}
    from model_store.blobs import tensor_hash

    distinct = {tensor_hash(v): v.numel() * v.element_size()
                for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert saved[0].shared_bytes == sum(distinct.values())
    for i in range(2):
        with torch.no_grad():
            assert torch.equal(load_model(f"m{i}", store, plugins=plugins).model(x), logits[i])
    assert all(r.ok for r in store.verify())


def test_tensors_found_in_a_blob_are_referenced_without_being_declared(store, plugins, tmp_path):
    """A partly frozen model (say --freeze 1) on imported weights: its frozen layers are the
    imported tensors, so they are referenced even when the caller names nothing."""
    model, meta = tiny_model(plugins, width=16)
    randomised(model)
    blob = import_weights(store, "tiny:tiny-cnn", _backbone_file(model, tmp_path / "w.pth"))
    with torch.no_grad():  # "train" the last batch norm and the head
        for k, t in model.state_dict().items():
            if k.startswith(("backbone.1.1.", "head.")) and t.is_floating_point():
                t.add_(0.25)
    info = store.save("partly", model.state_dict(), meta)
    assert info.blobs == [blob.name.split(".")[0]]
    own = _own_keys(info.path)
    assert {"backbone.0.0.weight", "backbone.1.0.weight"}.isdisjoint(own)  # from the blob
    assert "backbone.1.1.weight" in own and "head.0.weight" in own
    loaded = store.read("partly").tensors
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_partly_frozen_models_share_their_frozen_layers(store, plugins):
    """``shared`` names the frozen tensors: on random weights the first model puts them in
    a blob and the second, with the same frozen layers, refers to it."""
    model, meta = tiny_model(plugins, width=16)
    frozen = [k for k in model.state_dict() if k.startswith("backbone.0.")]
    first = store.save("p1", model.state_dict(), meta, shared=frozen)
    assert _own_keys(first.path).isdisjoint(frozen) and len(first.blobs) == 1
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if k.startswith("backbone.1.") and t.is_floating_point():
                t.mul_(1.5)
    second = store.save("p2", model.state_dict(), meta, shared=frozen)
    assert second.blobs == first.blobs
    assert len(list(store.bases_dir.iterdir())) == 1
    loaded = store.read("p2").tensors
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    with pytest.raises(StoreError, match="no tensor 'backbone.nope' to share"):
        store.save("p3", model.state_dict(), meta, shared=["backbone.nope"])
    with pytest.raises(StoreError, match="no tensor name starts with 'neck.'"):
        store.save("p3", model.state_dict(), meta, shared=["neck."])


def test_identical_tensors_are_stored_once(store, plugins):
    _, meta = tiny_model(plugins)
    ones = torch.ones(4096)
    state = {"backbone.a": ones, "backbone.b": ones.clone(), "backbone.c": torch.zeros(7),
             "head.w": torch.ones(4096)}
    info = store.save("twins", state, meta, shared_prefix="backbone.")
    from safetensors.torch import load_file

    [blob] = store.bases_dir.iterdir()
    assert sorted(load_file(str(blob))) == ["backbone.a", "backbone.c"]  # a and b: once
    assert "head.w" in _own_keys(info.path)  # not shareable: the model file keeps it
    read = store.read("twins").tensors
    assert sorted(read) == sorted(state)
    assert all(torch.equal(read[k], v) for k, v in state.items())
    read["backbone.a"].zero_()
    assert torch.equal(read["backbone.b"], ones)  # two tensors, not one aliased


def test_a_model_sharing_only_small_tensors_does_not_pin_a_blob(store, plugins):
    big, meta = tiny_model(plugins, width=16)
    randomised(big)
    a = store.save("a", big.state_dict(), meta, shared_prefix="backbone.")
    other = randomised(tiny_model(plugins, width=16, seed=3)[0])
    state = other.state_dict()
    state["backbone.0.1.num_batches_tracked"] = big.state_dict()[
        "backbone.0.1.num_batches_tracked"].clone()  # equal by chance, and tiny
    b = store.save("b", state, meta, shared_prefix="backbone.")
    assert set(b.blobs).isdisjoint(a.blobs)
    store.remove("a")
    assert not store.base_path(a.base_ref).exists()  # b does not keep a's blob alive
    loaded = store.read("b").tensors
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_reimport_keeps_models_on_the_old_weights(store, plugins, tmp_path):
    model, meta = tiny_model(plugins, width=16)
    randomised(model)
    old = import_weights(store, "tiny:tiny-cnn", _backbone_file(model, tmp_path / "old.pth"))
    x = images()
    with torch.no_grad():
        before = model(x)
    store.save("on-old", model.state_dict(), meta, shared_prefix="backbone.")
    newer = randomised(tiny_model(plugins, width=16, seed=9)[0])
    new = import_weights(store, "tiny:tiny-cnn", _backbone_file(newer, tmp_path / "new.pth"))
    assert new != old and old.exists() and store.find_weights("tiny:tiny-cnn") == new
    with torch.no_grad():
        assert torch.equal(load_model("on-old", store, plugins=plugins).model(x), before)
    assert all(r.ok for r in store.verify())
    store.remove("on-old")
    assert not old.exists() and new.exists()  # nothing refers to the old weights any more
    # reimporting with no model on the weights drops the replaced blob at once
    third = import_weights(store, "tiny:tiny-cnn", _backbone_file(model, tmp_path / "x.pth"))
    assert sorted(store.bases_dir.iterdir()) == [third]


def test_gc_removes_orphan_blobs_and_keeps_all_when_a_header_is_unreadable(store, plugins):
    from model_store.blobs import tensor_hash

    model, meta = tiny_model(plugins)
    store.save("m", model.state_dict(), meta, shared_prefix="backbone.")
    t = {"w": torch.arange(10.0)}
    orphan, _, written = store.blobs.write(t, {"w": tensor_hash(t["w"])})  # a killed save
    assert written and store.base_path(orphan).exists()
    junk = store.models_dir / "junk.safetensors"
    junk.write_bytes(b"\x01")  # a header nobody can read might name any blob
    assert store.gc() == []
    assert store.base_path(orphan).exists()
    assert [d.name for d in store.damaged()] == ["junk"]
    junk.unlink()
    assert store.gc() == [store.base_path(orphan)]
    assert all(r.ok for r in store.verify())


def test_verify_and_read_name_a_missing_blob_or_tensor(store, plugins):
    model, meta = tiny_model(plugins)
    info = store.save("m", model.state_dict(), meta, shared_prefix="backbone.")
    good = _good_meta(plugins)
    good.update(format_version=2, shared={"blobs": [{"sha256": info.base_ref}],
                                          "tensors": {"backbone.extra": [0, "nope"]}})
    _write_with_meta(store, "edited", json.dumps(good), plugins)
    [result] = store.verify("edited")
    assert not result.ok and "has no tensor 'nope'" in result.problem
    with pytest.raises(StoreError, match="have no tensor 'nope'"):
        store.read("edited")
    good["shared"]["blobs"][0]["sha256"] = "1" * 64
    _write_with_meta(store, "gone", json.dumps(good), plugins)
    assert "missing" in store.verify("gone")[0].problem
    with pytest.raises(StoreError, match="model 'gone': its shared weights .* are missing"):
        store.read("gone")


# -- format 1 (tk before the blobs) ---------------------------------------------------------

def save_v1(store: ModelStore, name: str, state: dict, meta: dict,
            shared_prefix: str | None = None) -> Path:
    """What ModelStore.save wrote in format 1: a base holding the prefixed tensors (plain
    safetensors named by its sha256, no tensor map), the model file with ``base``."""
    import hashlib

    tensors, base = dict(state), None
    store.bases_dir.mkdir(parents=True, exist_ok=True)
    store.models_dir.mkdir(parents=True, exist_ok=True)
    if shared_prefix:
        shared = {k[len(shared_prefix):]: v for k, v in tensors.items()
                  if k.startswith(shared_prefix)}
        tensors = {k: v for k, v in tensors.items() if not k.startswith(shared_prefix)}
        raw = serialize(shared)
        sha = hashlib.sha256(raw).hexdigest()
        store.base_path(sha).write_bytes(raw)
        base = {"sha256": sha, "prefix": shared_prefix, "size_bytes": len(raw),
                "tensors": len(shared)}
    m = dict(meta, format_version=1, name=name, created="2024-05-01T10:00:00.000000+00:00",
             base=base)
    chunks, _ = seal(serialize(tensors, {"tk": json.dumps(m)}))
    path = store.model_path(name)
    path.write_bytes(b"".join(bytes(c) for c in chunks))
    return path


def save_v1_weights(store: ModelStore, backbone: str, state: dict) -> Path:
    plugin, name = backbone.split(":")
    info = {"source_name": "old.pth", "source_sha256": "ab" * 32, "tk_version": "0.1.0",
            "format_version": 1, "backbone": backbone, "imported": "2024-04-01T00:00:00+00:00"}
    chunks, _ = seal(serialize(state, {"tk_weights": json.dumps(info), "format": "pt"}))
    path = store.weights_dir / plugin / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(c) for c in chunks))
    return path


def test_format_1_models_are_read_listed_verified_and_shared(store, plugins):
    model, meta = tiny_model(plugins, width=16)
    randomised(model)
    x = images()
    with torch.no_grad():
        expected = model(x)
    save_v1(store, "old-full", model.state_dict(), meta)
    save_v1(store, "old-a", model.state_dict(), meta, shared_prefix="backbone.")
    save_v1(store, "old-b", model.state_dict(), meta, shared_prefix="backbone.")
    [base] = store.bases_dir.iterdir()
    infos = {i.name: i for i in store.list()}
    assert set(infos) == {"old-full", "old-a", "old-b"}
    assert infos["old-a"].format_version == 1 and infos["old-a"].blobs == [base.stem]
    assert infos["old-full"].blobs == []
    for name in infos:
        with torch.no_grad():
            assert torch.equal(load_model(name, store, plugins=plugins).model(x), expected)
    assert all(r.ok for r in store.verify()) and len(store.verify()) == 4
    assert store.show("old-a")["file"]["base_path"] == str(base)
    # a new model on the same frozen weights refers to the old base: no second copy
    new = store.save("new", model.state_dict(), meta, shared_prefix="backbone.")
    assert new.blobs == [base.stem] and list(store.bases_dir.iterdir()) == [base]
    with torch.no_grad():
        assert torch.equal(load_model("new", store, plugins=plugins).model(x), expected)
    store.remove("old-a")
    store.remove("old-b")
    assert base.exists()  # "new" uses it
    store.remove("new")
    assert not base.exists()


def test_format_1_imported_weights_are_read_then_turned_into_a_blob(store, plugins):
    model, meta = tiny_model(plugins, width=16)
    randomised(model)
    state = {k[len("backbone."):]: v for k, v in model.state_dict().items()
             if k.startswith("backbone.")}
    old = save_v1_weights(store, "tiny:tiny-cnn", state)
    assert store.find_weights("tiny:tiny-cnn") == old == store.find_weights("tiny-cnn")
    assert all(torch.equal(store.load_weights("tiny:tiny-cnn")[k], v) for k, v in state.items())
    assert store.weights_info("tiny:tiny-cnn")["source_name"] == "old.pth"
    assert [w["blob"] for w in store.list_weights()] == [None]
    assert [r.name for r in store.verify() if r.ok] == ["weights:tiny:tiny-cnn"]
    # the next save that can share turns it into blob + pointer, and refers to it
    info = store.save("m", model.state_dict(), meta, shared_prefix="backbone.")
    assert not old.exists()
    blob = store.find_weights("tiny:tiny-cnn")
    assert info.blobs == [blob.stem] and list(store.bases_dir.iterdir()) == [blob]
    moved = store.weights_info("tiny:tiny-cnn")
    assert moved["source_name"] == "old.pth" and moved["imported"] == "2024-04-01T00:00:00+00:00"
    assert moved["source_metadata"] == {"format": "pt"}
    assert all(torch.equal(store.load_weights("tiny:tiny-cnn")[k], v) for k, v in state.items())
    assert all(r.ok for r in store.verify())


# -- files that are not what they seem -------------------------------------------------------

@pytest.fixture
def deadline():
    """Fail (instead of hanging) if the test body blocks for more than 20 s."""
    def expired(signum, frame):
        raise TimeoutError("blocked: something opened a FIFO")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifos_in_the_store_are_never_opened(store, plugins, deadline):
    model, meta = tiny_model(plugins)
    store.save("m", model.state_dict(), meta, shared_prefix="backbone.")
    store.save("other", model.state_dict(), meta)
    os.mkfifo(store.models_dir / "pipe.safetensors")
    os.mkfifo(store.bases_dir / f"{'f' * 64}.safetensors")
    (store.weights_dir / "tiny").mkdir(parents=True)
    os.mkfifo(store.weights_dir / "tiny" / "tiny-cnn.json")
    assert [i.name for i in store.list()] == ["other", "m"]
    assert store.newest().name == "other"
    [bad] = store.damaged()
    assert bad.name == "pipe" and "is a FIFO, not a model file" in bad.problem
    problems = {r.name: r.problem for r in store.verify() if not r.ok}
    assert set(problems) == {"pipe", f"blob:{'f' * 12}", "weights:tiny:tiny-cnn"}
    assert all("FIFO" in p for p in problems.values())
    for call in (store.info, store.read, store.show):
        with pytest.raises(StoreError, match="FIFO"):
            call("pipe")
    with pytest.raises(StoreError, match="FIFO"):
        store.find_weights("tiny:tiny-cnn")
    store.gc()
    store.save("third", model.state_dict(), meta, shared_prefix="backbone.")
    assert load_model("m", store, plugins=plugins).classes == ["cat", "dog", "fish"]
    assert store.remove("pipe").freed_bytes == 0


def test_owns_catches_links_hard_links_and_new_files(store, plugins, tmp_path):
    model, meta = tiny_model(plugins)
    info = store.save("m", model.state_dict(), meta)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "free.txt").write_text("x")
    os.symlink(info.path, outside / "link.safetensors")
    os.link(info.path, outside / "hard.safetensors")
    os.symlink(store.models_dir, outside / "models-link")
    kept = outside / "kept.safetensors"
    kept.write_bytes(b"a model kept elsewhere")
    os.symlink(kept, store.models_dir / "linked.safetensors")
    inside = [info.path, store.models_dir / "new.safetensors", store.root,
              outside / "link.safetensors", outside / "hard.safetensors",
              outside / "models-link" / "m.safetensors", outside / "models-link" / "n.csv",
              kept, store.root / "weights" / "x" / "y.json"]
    for p in inside:
        assert store.owns(p), p
    for p in (outside / "free.txt", outside / "new.csv", tmp_path / "nowhere" / "x.csv"):
        assert not store.owns(p), p


def test_rm_of_a_linked_model_frees_nothing_and_keeps_the_file(store, plugins, tmp_path):
    model, meta = tiny_model(plugins)
    info = store.save("real", model.state_dict(), meta)
    target = tmp_path / "elsewhere.safetensors"
    info.path.rename(target)
    os.symlink(target, info.path)
    assert [i.name for i in store.list()] == ["real"]
    done = store.remove("real")
    assert done.freed_bytes == 0 and str(target) in done.kept and target.exists()
    info = store.save("hard", model.state_dict(), meta)
    os.link(info.path, tmp_path / "hard-copy")
    done = store.remove("hard")
    assert done.freed_bytes == 0 and "hard link" in done.kept


# -- the atomic writer -----------------------------------------------------------------------

ATOMIC_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from model_store.atomic import atomic_file
    with atomic_file(Path(sys.argv[1]), "checkpoint") as fh:
        fh.write(b"x" * 1_000_000)
        fh.flush()
        print("writing", flush=True)
        time.sleep(600)
""")


def test_dead_writers_temp_files_do_not_outlive_the_next_write(tmp_path):
    from model_store.atomic import atomic_write

    folder = tmp_path / "runs" / "x"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for reap in (False, True):  # killed and reaped, and killed but still a zombie
        child = subprocess.Popen([sys.executable, "-c", ATOMIC_CHILD,
                                  str(folder / "checkpoint.safetensors")],
                                 env=env, stdout=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"writing\n"
            [temp] = _temps(folder)
            assert temp.stat().st_size == 1_000_000
            # a live writer's temp file survives other writes in its folder
            atomic_write(folder / "other.bin", [b"1"], "other")
            assert temp.exists()
            child.send_signal(signal.SIGKILL)
            if reap:
                child.wait()
            else:
                while _proc_state(child.pid) not in ("Z", None):
                    time.sleep(0.01)
            atomic_write(folder / "other.bin", [b"2"], "other")
            assert _temps(folder) == [], "the dead writer's temp file outlived a write"
        finally:
            child.kill()
            child.wait()
    assert sorted(p.name for p in folder.iterdir()) == ["other.bin"]


def _proc_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2]


def test_temp_of_a_reused_pid_is_stale(tmp_path):
    from model_store.atomic import _own_start, clean_stale_temps

    start = _own_start()
    if start is None:
        pytest.skip("no /proc: pid reuse cannot be told apart here")
    mine = tmp_path / f".tk-tmp-{os.getpid()}.{start}-ab-x"
    reused = tmp_path / f".tk-tmp-{os.getpid()}.{start + 1}-ab-y"  # same pid, other process
    old_style = tmp_path / f".tk-tmp-{os.getpid()}-ab-z"
    for p in (mine, reused, old_style):
        p.write_bytes(b"partial")
    assert clean_stale_temps(tmp_path) == [reused]


def test_atomic_file_streams_and_cleans_up_after_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from model_store.atomic import atomic_file

    target = tmp_path / "ckpt.safetensors"
    with atomic_file(target, "checkpoint") as fh:  # a library that only takes a path
        save_file({"w": torch.arange(3.0)}, fh.name)
    assert torch.equal(load_file(str(target))["w"], torch.arange(3.0))
    with pytest.raises(ZeroDivisionError), atomic_file(target, "checkpoint") as fh:
        fh.write(b"half a file")
        1 / 0  # noqa: B018
    assert torch.equal(load_file(str(target))["w"], torch.arange(3.0))  # old file intact
    assert _temps(tmp_path) == []
    with atomic_file(tmp_path / "state.pt", "checkpoint") as fh:
        torch.save({"epoch": 3}, fh)
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {"epoch": 3}


# -- the real size: alexnet ---------------------------------------------------------------

def _du(root: Path) -> int:
    """Bytes of the regular files under ``root``, each inode once (what `du -b` counts)."""
    seen, total = set(), 0
    for p in root.rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


@pytest.mark.slow
def test_alexnet_frozen_models_share_one_base(tmp_path, capsys):
    """The issue's case through the real commands: a 233 MB alexnet .pth imported with
    `tk store import-weights`, then two `tk finetune --freeze all` models on it. The store
    grows by the model files (and plots, the feature cache) only: no copy of the
    backbone."""
    import torchvision

    torch.manual_seed(0)
    pth = tmp_path / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), pth)
    root = tmp_path / "store"
    env = dict(os.environ, TK_HOME=str(root), TORCH_HOME=str(tmp_path / "torch"),
               HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    env.pop("TK_DEBUG", None)

    def tk(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "toolkit", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        return proc

    tk("store", "import-weights", "torchvision:alexnet", str(pth))
    imported = _du(root)
    store = ModelStore(root)
    [blob] = store.bases_dir.iterdir()
    sizes = [imported]
    for name, seed in (("alex-a", "1"), ("alex-b", "2")):
        proc = tk("finetune", "--backbone", "torchvision:alexnet", "--freeze", "all",
                  "--name", name, "--seed", seed, "--classes", "2", "--opt",
                  "dataset.samples=20", "--opt", "dataset.image_size=64", "--image-size",
                  "64", "--batch-size", "10", "--epochs", "1")
        assert "weights: store" in proc.stderr
        sizes.append(_du(root))
    infos = {i.name: i for i in store.list()}
    assert list(store.bases_dir.iterdir()) == [blob]  # the imported blob, nothing else
    assert all(i.blobs == [blob.stem] for i in infos.values())
    models = sum(i.size_bytes for i in infos.values())
    parts = store.usage()
    with capsys.disabled():
        print(f"\n[store sizes, alexnet] .pth {pth.stat().st_size:,} B; store after "
              f"import-weights {imported:,} B (blob {blob.stat().st_size:,} B); after two "
              f"--freeze all models {sizes[1]:,} B then {sizes[2]:,} B: +"
              f"{(sizes[2] - imported) / 1e6:.2f} MB (model files {models:,} B: "
              f"{', '.join(f'{i.name} {i.size_bytes:,} B' for i in infos.values())}; "
              f"other {parts['other']:,} B: plots, feature cache)")
    assert sizes[2] - imported < 5e6  # a few MB, not a second 228 MB copy
    assert all(i.size_bytes < 1e6 for i in infos.values())
    assert all(r.ok for r in store.verify())
    for name in infos:
        stored = store.read(name)
        assert torch.equal(stored.tensors["backbone.features.0.weight"],
                           store.load_weights("torchvision:alexnet")["features.0.weight"])
