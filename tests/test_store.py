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
from model_store.fileformat import seal, serialize
from toolkit.errors import StoreError
from toolkit.model.assemble import Classifier, ModelSpec, build_classifier, build_head
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


def test_remove_garbage_collects_unreferenced_bases(store, plugins):
    model, meta = tiny_model(plugins, seed=0)
    other, _ = tiny_model(plugins, seed=1)
    a = store.save("a", model.state_dict(), meta, shared_prefix="backbone.")
    b = store.save("b", model.state_dict(), meta, shared_prefix="backbone.")
    c = store.save("c", other.state_dict(), meta, shared_prefix="backbone.")
    assert a.base_ref != c.base_ref
    base_a, base_c = store.base_path(a.base_ref), store.base_path(c.base_ref)
    freed = store.remove("a")
    assert freed == a.size_bytes and base_a.exists()  # still used by b
    base_a_size = base_a.stat().st_size
    freed = store.remove("b")
    assert not base_a.exists() and base_c.exists()
    assert freed == b.size_bytes + base_a_size
    # overwriting c with a model on another base drops c's old base
    store.save("c", model.state_dict(), meta, shared_prefix="backbone.", overwrite=True)
    assert not base_c.exists() and base_a.exists()
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
            assert set(problems) == {"m", f"base:{info.base_ref[:12]}"}
            with pytest.raises(StoreError, match=r"base weights .* are damaged"):
                load_model("m", store, plugins=plugins)
        flipper.restore(offset)
    flipper.close()
    assert store.verify("m")[0].ok
    base.unlink()
    assert "missing" in store.verify("m")[0].problem
    with pytest.raises(StoreError, match="base weights .* are missing"):
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
    assert path == store.root / "weights" / "tiny" / "tiny-cnn.safetensors"
    assert store.find_weights("tiny:tiny-cnn") == path
    assert store.find_weights("tiny-cnn") == path  # bare name, imported under one plugin
    assert store.find_weights("other:tiny-cnn") is None
    loaded = store.load_weights("tiny:tiny-cnn")
    assert loaded.keys() == tiny_backbone_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_backbone_state.items())
    info = store.weights_info("tiny:tiny-cnn")
    assert info["source_name"] == "tiny.pth" and info["backbone"] == "tiny:tiny-cnn"
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
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["format"] == "pt"
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": tiny_backbone_state, "epoch": 3}, wrapped)
    import_weights(store, "tiny:tiny-cnn", wrapped)  # replaces the earlier import
    assert store.weights_info("tiny:tiny-cnn")["source_name"] == "ckpt.pth"


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


# -- the real size: alexnet --------------------------------------------------------------

class _AlexnetPlugin:
    """Random-init alexnet backbone (all but the last classifier layer), registered as
    'alexnet-random' so the store can rebuild it."""

    @staticmethod
    def build(pretrained=False):
        import torchvision
        from torch import nn

        from toolkit.model.backbone import Backbone, DataConfig

        net = torchvision.models.alexnet(weights=None)
        net.classifier[6] = nn.Identity()
        return Backbone(module=net, num_features=4096, data_config=DataConfig(),
                        layer_groups=[net.features, net.classifier])

    from toolkit.plugin.hookspecs import hookimpl

    @hookimpl
    def tk_register_backbones(self, register):
        register("alexnet-random", self.build)


@pytest.mark.slow
def test_alexnet_frozen_models_share_one_base(store, capsys):
    from toolkit.plugin.manager import PluginRecord

    plugins = load_plugins(modules=[], env={})
    plugins.add(_AlexnetPlugin(), PluginRecord("alexnet-test", "tests", "test"))
    torch.manual_seed(0)
    backbone = _AlexnetPlugin.build().module
    metas, logits = [], []
    x = images(n=2, size=64)
    for i, classes in enumerate((["a", "b", "c", "d", "e"], ["x", "y"])):
        head = build_head(plugins, "linear", 4096, len(classes), {})
        model = Classifier(backbone, head).eval()
        with torch.no_grad():
            logits.append(model(x))
        spec = ModelSpec("alexnet-test:alexnet-random", len(classes))
        meta = {"spec": spec.to_dict(), "classes": classes, "data_config": {
            "input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.25] * 3},
            "training": {"freeze": "all"}, "metrics": {}, "weights": {"source": "random"}}
        metas.append(store.save(f"alex{i}", model.state_dict(), meta, shared_prefix="backbone."))
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    bases = list(store.bases_dir.glob("*.safetensors"))
    assert len(bases) == 1
    base_size = bases[0].stat().st_size
    sizes = [m.size_bytes for m in metas]
    with capsys.disabled():
        print(f"\n[store sizes, alexnet] full classifier tensors {full / 1e6:.1f} MB; shared "
              f"base {base_size / 1e6:.1f} MB; model files {sizes[0] / 1e3:.1f} kB (5 classes)"
              f" and {sizes[1] / 1e3:.1f} kB (2 classes); store total "
              f"{sum(p.stat().st_size for p in store.root.rglob('*') if p.is_file()) / 1e6:.1f}"
              " MB")
    assert base_size > 200e6
    assert all(s < 1e6 for s in sizes)
    loaded = load_model("alex1", store, plugins=plugins)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), logits[1])
    assert all(r.ok for r in store.verify())
