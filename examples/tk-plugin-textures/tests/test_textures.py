"""Tests of tk-plugin-textures, written the way docs/plugins.md suggests: components through
a fresh plugin manager (``toolkit.testing.fresh_plugins``), the command and a tiny training
run through the real ``tk`` CLI in a subprocess. Run with the package installed
(``pip install -e .``): ``pytest tests``."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tk_textures.plugin
import torch
from tk_textures.backbone import WEIGHTS_FILE
from tk_textures.manifest import write_manifest
from tk_textures.patterns import texture_image
from torch.nn import functional as F

from toolkit.errors import DataError, TkError, WeightsNotFoundError
from toolkit.testing import fresh_plugins, run_tk, tiny_finetune

NAMES = {"backbones": "texture-cnn", "heads": "cosine", "losses": "poly1",
         "optimizers": "lion", "datasets": "textures"}


@pytest.fixture(scope="module")
def plugins():
    # the name "textures" is the entry-point name, as when tk loads the installed package
    return fresh_plugins(("textures", tk_textures.plugin))


def build(plugins, kind, *args, **options):
    name = "json-manifest" if kind == "datasets" and "path" in options else NAMES[kind]
    return plugins.registry(kind).build(f"textures:{name}", *args, **options)


def test_registers_one_component_of_each_kind(plugins):
    for kind, name in NAMES.items():
        component = plugins.registry(kind).resolve(name)
        assert component.owner == "textures" and component.info["description"]
    assert plugins.registry("datasets").resolve("json-manifest").owner == "textures"
    assert plugins.registry("optimizers").resolve("lion").default_lr == 1e-4
    assert not [r for r in plugins.records.values() if r.error or r.problems]


def test_backbone_keeps_the_contract(plugins):
    backbone = build(plugins, "backbones", False)
    assert backbone.data_config.input_size == (3, 32, 32)
    assert backbone.weights.source == "random"
    features = backbone.module.eval()(torch.randn(3, 3, 32, 32))
    assert features.shape == (3, backbone.num_features) == (3, 64)
    in_groups = [id(p) for group in backbone.layer_groups for p in group.parameters()]
    assert sorted(in_groups) == sorted(id(p) for p in backbone.module.parameters())
    wide = build(plugins, "backbones", False, width=8)
    assert wide.module(torch.randn(2, 3, 40, 40)).shape == (2, 32)  # any input size works


def test_pretrained_uses_the_shipped_weights_or_a_given_file(plugins, tmp_path):
    shipped = build(plugins, "backbones", True)
    assert shipped.weights.source == "package"
    assert shipped.weights.sha256 == hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 32, 32)
    expected = shipped.module.eval()(x)
    assert not torch.allclose(expected, build(plugins, "backbones", False).module.eval()(x))

    from safetensors.torch import save_file

    as_safetensors = tmp_path / "copy.safetensors"
    save_file(shipped.module.state_dict(), str(as_safetensors))
    as_pth = tmp_path / "copy.pth"
    torch.save({"backbone." + k: v for k, v in shipped.module.state_dict().items()}, as_pth)
    for path in (as_safetensors, as_pth):
        loaded = build(plugins, "backbones", str(path))
        assert loaded.weights.source == "file" and loaded.weights.file == str(path)
        assert torch.allclose(loaded.module.eval()(x), expected)

    with pytest.raises(TkError, match="width=16 only"):
        build(plugins, "backbones", True, width=8)
    with pytest.raises(TkError, match="does not exist|not found"):
        build(plugins, "backbones", str(tmp_path / "missing.safetensors"))
    with pytest.raises(TkError, match="does not fit width=8"):
        build(plugins, "backbones", str(as_safetensors), width=8)


def test_cosine_head_gives_bounded_logits(plugins):
    head = build(plugins, "heads", 64, 5, scale=10.0, learn_scale=False)
    logits = head(torch.randn(4, 64) * 100)
    assert logits.shape == (4, 5) and logits.abs().max() <= 10.0 + 1e-4
    assert [n for n, _ in head.named_parameters()] == ["weight"]


def test_poly1_is_cross_entropy_plus_epsilon_times_one_minus_p(plugins):
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    ce = F.cross_entropy(logits, targets)
    assert torch.allclose(build(plugins, "losses", epsilon=0.0)(logits, targets), ce)
    p = logits.softmax(1)[torch.arange(6), targets]
    assert torch.allclose(build(plugins, "losses", epsilon=2.0)(logits, targets),
                          ce + 2.0 * (1 - p).mean())


def test_lion_steps_by_lr_in_the_sign_direction_and_honours_groups(plugins):
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.ones(2))
    groups = [{"params": [a]}, {"params": [b], "lr": 0.5, "weight_decay": 0.0}]
    opt = build(plugins, "optimizers", groups, 0.1, 0.5)
    a.grad = torch.tensor([2.0, -0.001, 0.0])
    b.grad = torch.tensor([-3.0, 1.0])
    opt.step()
    assert torch.allclose(a, torch.tensor([-0.1, 0.1, 0.0]))  # decay of 0 is 0
    assert torch.allclose(b, torch.tensor([1.5, 0.5]))  # own lr, no decay
    c = torch.nn.Parameter(torch.ones(1))
    decayed = build(plugins, "optimizers", [{"params": [c]}], 0.1, 0.5)
    c.grad = torch.zeros(1)
    decayed.step()
    assert torch.allclose(c, torch.tensor([0.95]))  # decoupled: p * (1 - lr * wd)


def test_dataset_is_generated_deterministic_and_stratified(plugins):
    source = build(plugins, "datasets", num_classes=3, per_class=10, seed=1)
    assert source.classes == ["stripes-h", "stripes-v", "checker"]
    to_tensor = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32))  # noqa: E731
    train, val = source.splits(to_tensor, to_tensor, val_split=0.2, seed=0)
    assert (len(train), len(val)) == (24, 6)
    assert sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]
    again = build(plugins, "datasets", num_classes=3, per_class=10, seed=1)
    assert torch.equal(again.splits(to_tensor, to_tensor, val_split=0.2, seed=0)[1][0][0],
                       val[0][0])
    with pytest.raises(TkError, match="between 2 and 6"):
        build(plugins, "datasets", num_classes=7)
    with pytest.raises(TkError, match="takes no --data"):
        plugins.registry("datasets").build("textures:textures", path="images/")


def test_missing_shipped_weights_say_what_was_tried(plugins, monkeypatch, tmp_path):
    import tk_textures.backbone

    gone = tmp_path / "texture_cnn_w16.safetensors"
    monkeypatch.setattr(tk_textures.backbone, "WEIGHTS_FILE", gone)
    with pytest.raises(WeightsNotFoundError) as err:
        build(plugins, "backbones", True)
    assert err.value.tried == [f"the weights shipped with tk-plugin-textures {gone}: not there"]
    assert "download" not in str(err.value)


def test_preview_command_writes_an_image_folder(tmp_path):
    out = tmp_path / "out"
    proc = run_tk("textures-preview", str(out), "--classes", "2", "--per-class", "3",
                  "--manifest", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.parent.name for p in out.rglob("*.png")) == ["stripes-h"] * 3 + [
        "stripes-v"] * 3
    listed = json.loads((out / "manifest.json").read_text())["images"]
    assert {(e["path"], e["label"]) for e in listed} == {
        (p.relative_to(out).as_posix(), p.parent.name) for p in out.rglob("*.png")}


def _manifest(root, labels=("stripes-h", "stripes-v"), per_class=4):
    files = []
    for label, name in enumerate(labels):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            file = root / name / f"{i}.png"
            texture_image(label, i, 24, 0).save(file)
            files.append((file, name))
    return write_manifest(root, files)


def test_json_manifest_is_claimed_for_json_files_only(plugins, tmp_path):
    manifest = _manifest(tmp_path)
    assert plugins.dataset_for_path(str(manifest)) == "json-manifest"
    assert plugins.dataset_for_path(str(tmp_path)) == "imagefolder"  # a folder: the built-in
    assert plugins.dataset_for_path(str(tmp_path / "list.csv")) == "csv"


def test_json_manifest_reads_and_splits(plugins, tmp_path):
    manifest = _manifest(tmp_path)
    source = build(plugins, "datasets", path=str(manifest))
    assert source.classes == ["stripes-h", "stripes-v"]
    assert len(source.samples) == 8 and all(p.endswith(".png") for p, _ in source.samples)
    to_tensor = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32))  # noqa: E731
    train, val = source.splits(to_tensor, to_tensor, val_split=0.25, seed=0)
    assert (len(train), len(val)) == (6, 2) and sorted(y for _, y in val) == [0, 1]
    assert val[0][0].shape == (24, 24, 3)

    data = json.loads(manifest.read_text())
    for i, entry in enumerate(data["images"]):
        entry["split"] = "val" if i % 4 == 0 else "train"
    manifest.write_text(json.dumps(data))
    train, val = build(plugins, "datasets", path=str(manifest)).splits(
        to_tensor, to_tensor, val_split=0.5, seed=0)
    assert (len(train), len(val)) == (6, 2)


@pytest.mark.parametrize(("content", "problem"), [
    ("not json", "not readable JSON"),
    ('{"images": []}', 'needs a non-empty list "images"'),
    ('{"images": [{"path": "../x.png", "label": "a"}]}', "outside the manifest's folder"),
    ('{"images": [{"path": "nope.png", "label": "a"}]}', "does not exist"),
    ('{"classes": ["b"], "images": [{"path": "x.png", "label": "a"}]}', "not one of"),
    ('{"images": [{"path": "x.png"}]}', 'needs "path" and "label"'),
])
def test_json_manifest_mistakes_are_one_line(plugins, tmp_path, content, problem):
    manifest = tmp_path / "m.json"
    manifest.write_text(content)
    with pytest.raises(DataError, match=f"^manifest {manifest}: .*{problem}"):
        build(plugins, "datasets", path=str(manifest))


def test_a_tiny_finetune_uses_every_component_and_the_observer(tmp_path):
    journal = tmp_path / "journal.jsonl"
    run = tiny_finetune("texture-cnn", classes=2, dataset="textures", head="cosine",
                        loss="poly1", optimizer="lion", opts=["dataset.per_class=6"],
                        extra_args=["--log", "journal"],
                        home=tmp_path, env={"TK_TEXTURES_JOURNAL": str(journal)})
    assert run.metadata is not None and run.metadata["classes"] == ["stripes-h", "stripes-v"]
    events = [json.loads(line)["event"] for line in journal.read_text().splitlines()]
    assert events == ["train_start", "epoch_end", "model_saved", "train_end"]
    logged = run.store / "runs" / run.name / "logs" / "journal.jsonl"  # --log journal
    lines = [json.loads(line) for line in logged.read_text().splitlines()]
    assert [line["event"] for line in lines] == events
    assert lines[-1]["status"] == "finished" and lines[2]["artifacts"] == ["confusion", "curves"]
