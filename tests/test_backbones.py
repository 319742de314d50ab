"""The built-in backbone plugins (torchvision, timm): registration, features, layer groups,
data configs and where weights come from. CPU only, small inputs, no downloads: weight
files are random-init state dicts the tests write under the real file names."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from plugins import timm_backbones, torchvision_backbones
from toolkit.errors import TkError, WeightsNotFoundError
from toolkit.model.backbone import INTERPOLATIONS, Backbone
from toolkit.model.layer_groups import check_layer_groups
from toolkit.plugin.manager import load_plugins

REPO = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_backbone(b: Backbone, size: int) -> None:
    """Features [2, F] at ``size`` px, every parameter in exactly one group, sane config."""
    assert isinstance(b, Backbone)
    b.module.eval()
    with torch.no_grad():
        out = b.module(torch.randn(2, 3, size, size))
    assert out.shape == (2, b.num_features)
    assert len(b.layer_groups) >= 2
    check_layer_groups(b.module, b.layer_groups)
    n_params = sum(p.numel() for p in b.module.parameters())
    assert sum(p.numel() for g in b.layer_groups for p in g.parameters()) == n_params
    dc = b.data_config
    assert dc.input_size[0] == 3 and dc.input_size[1] >= 32
    assert 0.5 < dc.crop_pct <= 1.0
    assert len(dc.mean) == 3 and len(dc.std) == 3 and all(s > 0 for s in dc.std)
    assert dc.interpolation in INTERPOLATIONS


def _state_equal(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert own.keys() <= expected.keys()
    for key, value in own.items():
        assert torch.equal(value, expected[key]), key


# -- registration -----------------------------------------------------------------------

def test_registry_through_plugin_loading():
    plugins = load_plugins(env={})
    registry = plugins.registry("backbones")
    names = {(c.name, c.owner) for c in registry.list()}
    assert ("alexnet", "torchvision") in names
    assert ("resnet18", "torchvision") in names
    assert ("resnet18", "timm") in names
    assert ("resnet50.a1_in1k", "timm") in names
    assert registry.resolve("resnet18").owner == "torchvision"  # timm yields bare names
    assert registry.resolve("timm:resnet18").owner == "timm"
    assert registry.resolve("resnet50.a1_in1k").owner == "timm"
    assert registry.conflicts() == {}
    alexnet = registry.resolve("alexnet")
    assert alexnet.info["num_params"] == 61100840
    assert "IMAGENET1K_V1" in alexnet.info["weights"]
    assert [c.name for c in registry.list("torchvision:vgg1?")] == [
        "vgg11", "vgg13", "vgg16", "vgg19"]
    assert {c.owner for c in registry.list("vgg11")} == {"torchvision", "timm"}


# -- torchvision ------------------------------------------------------------------------

TV_SAMPLE = [
    ("alexnet", {}, 64),
    ("resnet18", {}, 64),
    ("vgg11", {}, 32),
    ("mobilenet_v3_small", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("convnext_tiny", {}, 64),
    ("squeezenet1_1", {}, 64),
    ("densenet121", {}, 64),
    ("googlenet", {}, 64),
    ("vit_b_16", {"image_size": 32}, 32),
]


@pytest.mark.parametrize("name,options,size", TV_SAMPLE, ids=[s[0] for s in TV_SAMPLE])
def test_torchvision_backbone(name, options, size):
    b = torchvision_backbones.build(name, False, **options)
    _check_backbone(b, size)
    assert b.weights.source == "random"
    assert b.name == f"torchvision:{name}"


def test_alexnet_keeps_fc6_fc7():
    b = torchvision_backbones.build("alexnet", False)
    assert b.num_features == 4096
    linears = [m for m in b.module.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(9216, 4096), (4096, 4096)]
    assert isinstance(b.module.classifier[-1], nn.Identity)
    # fc6 and fc7 are the last two layer groups, after the convolutional blocks
    fc6, fc7 = b.layer_groups[-2:]
    assert {id(p) for p in fc6.parameters()} == {id(p) for p in linears[0].parameters()}
    assert {id(p) for p in fc7.parameters()} == {id(p) for p in linears[1].parameters()}
    assert all(not any(isinstance(m, nn.Linear) for m in g.modules())
               for g in b.layer_groups[:-2])


def test_only_the_final_classifier_is_dropped():
    b = torchvision_backbones.build("mobilenet_v3_small", False)
    assert isinstance(b.module.classifier[0], nn.Linear)  # pre-logits Linear + Hardswish kept
    assert b.num_features == b.module.classifier[0].out_features == 1024
    sq = torchvision_backbones.build("squeezenet1_1", False)
    assert sq.num_features == 512


def test_layer_groups_follow_the_network():
    resnet = torchvision_backbones.build("resnet18", False)
    m = resnet.module
    expected = [[m.conv1, m.bn1], [m.layer1], [m.layer2], [m.layer3], [m.layer4]]
    for group, modules in zip(resnet.layer_groups, expected, strict=True):
        assert {id(p) for p in group.parameters()} == {
            id(p) for mod in modules for p in mod.parameters()}
    vit = torchvision_backbones.build("vit_b_16", False, image_size=32)
    stem = {id(p) for p in vit.layer_groups[0].parameters()}
    assert id(vit.module.class_token) in stem
    assert id(vit.module.encoder.pos_embedding) in stem
    assert id(vit.module.encoder.ln.weight) in {id(p) for p in vit.layer_groups[-1].parameters()}


def test_torchvision_data_config_and_options():
    b = torchvision_backbones.build("efficientnet_b0", False)
    assert b.data_config.interpolation == "bicubic"
    assert b.data_config.input_size == (3, 224, 224)
    v2 = torchvision_backbones.build("mobilenet_v3_large", False)
    v1 = torchvision_backbones.build("mobilenet_v3_large", False, weights_tag="IMAGENET1K_V1")
    assert v2.data_config.crop_pct == pytest.approx(224 / 232, abs=1e-3)
    assert v1.data_config.crop_pct == pytest.approx(224 / 256, abs=1e-3)
    alex = torchvision_backbones.build("alexnet", False, dropout=0.25)
    assert alex.module.classifier[0].p == 0.25
    with pytest.raises(TkError, match="unknown option 'bogus'.*dropout"):
        torchvision_backbones.build("alexnet", False, bogus=1)
    with pytest.raises(TkError, match="set by tk"):
        torchvision_backbones.build("resnet18", False, num_classes=3)
    with pytest.raises(TkError, match="unknown weights_tag.*IMAGENET1K_V1"):
        torchvision_backbones.build("resnet18", False, weights_tag="NOPE")


def _seeded_torchvision_state(name: str) -> dict[str, torch.Tensor]:
    import torchvision.models as tvm

    torch.manual_seed(1234)
    return tvm.get_model(name, weights=None).state_dict()


def test_torchvision_pretrained_from_hub_cache(tmp_path, monkeypatch):
    import torchvision.models as tvm

    filename = "mobilenet_v3_small-047dcff4.pth"  # the name torchvision downloads to
    assert tvm.get_model_weights("mobilenet_v3_small").DEFAULT.url.endswith("/" + filename)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = _seeded_torchvision_state("mobilenet_v3_small")
    torch.save(state, checkpoints / filename)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    b = torchvision_backbones.build("mobilenet_v3_small", True)
    _state_equal(b.module, state)
    assert "classifier.3.weight" not in b.module.state_dict()
    assert torch.equal(b.module.classifier[0].weight, state["classifier.0.weight"])
    assert b.weights.source == "cache"
    assert b.weights.sha256 == _sha256(checkpoints / filename)
    assert b.weights.file == str(checkpoints / filename)
    assert b.weights.tag == "IMAGENET1K_V1"
    assert b.weights.url.endswith(filename)


def test_torchvision_weights_from_file(tmp_path):
    state = _seeded_torchvision_state("squeezenet1_1")
    path = tmp_path / "squeeze.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    b = torchvision_backbones.build("squeezenet1_1", str(path))
    _state_equal(b.module, state)
    assert b.weights.source == "file" and b.weights.sha256 == _sha256(path)
    _check_backbone(b, 64)
    # the same file does not fit another architecture: one clear line naming keys
    with pytest.raises(TkError) as info:
        torchvision_backbones.build("resnet18", str(path))
    assert "do not fit" in str(info.value) and "conv1.weight" in str(info.value)


def test_pretrained_true_offline_fails_fast_and_clearly(tmp_path):
    """No weights in any cache and no network: WeightsNotFoundError naming file and URL,
    for both plugins. A subprocess with unreachable proxies keeps the download attempt
    from ever reaching a network, even on a machine that has one."""
    script = textwrap.dedent("""
        from toolkit.errors import WeightsNotFoundError
        from plugins import timm_backbones, torchvision_backbones
        for label, build, name in (("TV", torchvision_backbones.build, "mobilenet_v3_small"),
                                   ("TIMM", timm_backbones.build, "mobilenetv3_small_050")):
            try:
                build(name, True)
            except WeightsNotFoundError as exc:
                print(label, "|", exc)
            else:
                print(label, "| no error")
    """)
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"),
           "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
           "ALL_PROXY": dead, "NO_PROXY": "", "no_proxy": "", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" | ", 1) for line in proc.stdout.splitlines() if " | " in line)
    tv = lines["TV"]
    assert "mobilenet_v3_small-047dcff4.pth" in tv
    assert "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth" in tv
    assert "tk store import-weights mobilenet_v3_small" in tv
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in tv
    timm_msg = lines["TIMM"]
    assert "timm/mobilenetv3_small_050.lamb_in1k" in timm_msg
    assert "https://huggingface.co/timm/mobilenetv3_small_050.lamb_in1k" in timm_msg
    assert "tk store import-weights timm:mobilenetv3_small_050" in timm_msg
    assert not list((tmp_path / "torch").rglob("*.pth"))


def test_torchvision_download_into_the_hub_cache(tmp_path, monkeypatch):
    """The download path, with a file:// URL standing in for the server: the file lands in
    $TORCH_HOME/hub/checkpoints, its hash prefix is checked, the source is "download"."""
    import types

    import torchvision.models as tvm

    real = tvm.get_model_weights("mobilenet_v3_small").DEFAULT
    server = tmp_path / "server"
    server.mkdir()
    state = _seeded_torchvision_state("mobilenet_v3_small")
    torch.save(state, server / "blob.pth")
    sha = _sha256(server / "blob.pth")
    good = server / f"mnv3-{sha[:8]}.pth"
    bad = server / "mnv3-00000000.pth"
    for path in (good, bad):
        path.write_bytes((server / "blob.pth").read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def entry(path: Path) -> types.SimpleNamespace:
        return types.SimpleNamespace(url=path.as_uri(), name=real.name, meta=real.meta,
                                     transforms=real.transforms)

    monkeypatch.setattr(torchvision_backbones, "_pick_weights", lambda n, t: entry(good))
    b = torchvision_backbones.build("mobilenet_v3_small", True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / good.name
    assert cached.is_file()
    assert b.weights.source == "download" and b.weights.sha256 == sha
    _state_equal(b.module, state)

    monkeypatch.setattr(torchvision_backbones, "_pick_weights", lambda n, t: entry(bad))
    with pytest.raises(WeightsNotFoundError, match=bad.name):
        torchvision_backbones.build("mobilenet_v3_small", True)
    assert not (cached.parent / bad.name).exists()


def test_model_without_weights_asks_for_no_pretrained(monkeypatch):
    monkeypatch.setattr(torchvision_backbones, "_pick_weights", lambda name, tag: None)
    with pytest.raises(TkError, match="--no-pretrained"):
        torchvision_backbones.build("resnet18", True)


# -- timm -------------------------------------------------------------------------------

TIMM_SAMPLE = [
    ("resnet18", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
]


@pytest.mark.parametrize("name,options,size", TIMM_SAMPLE, ids=[s[0] for s in TIMM_SAMPLE])
def test_timm_backbone(name, options, size):
    b = timm_backbones.build(name, False, **options)
    _check_backbone(b, size)
    assert b.weights.source == "random"
    assert b.name == f"timm:{name}"


def test_timm_data_config_and_options():
    vit = timm_backbones.build("vit_tiny_patch16_224", False, img_size=32)
    assert vit.data_config.mean == (0.5, 0.5, 0.5)
    assert vit.data_config.interpolation == "bicubic"
    tagged = timm_backbones.build("resnet18.a1_in1k", False)
    assert tagged.data_config.crop_pct == pytest.approx(0.95)
    with pytest.raises(TkError, match="bad option"):
        timm_backbones.build("resnet18", False, bogus=1)
    with pytest.raises(TkError, match="set by tk"):
        timm_backbones.build("resnet18", False, num_classes=3)


def _seeded_timm_state(name: str) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(4321)
    return {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}


def test_timm_weights_from_local_file(tmp_path):
    state = _seeded_timm_state("mobilenetv3_small_050")
    path = tmp_path / "mnv3.safetensors"
    save_file(state, str(path))
    b = timm_backbones.build("mobilenetv3_small_050", str(path))
    _state_equal(b.module, state)
    assert "classifier.weight" in state and "classifier.weight" not in b.module.state_dict()
    assert b.weights.source == "file" and b.weights.sha256 == _sha256(path)
    with pytest.raises(TkError, match="do not fit"):
        timm_backbones.build("resnet18", str(path))


def test_timm_pretrained_from_hugging_face_cache(tmp_path, monkeypatch):
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg("mobilenetv3_small_050").hf_hub_id
    assert repo == "timm/mobilenetv3_small_050.lamb_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    state = _seeded_timm_state("mobilenetv3_small_050")
    save_file(state, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)

    b = timm_backbones.build("mobilenetv3_small_050", True)
    _state_equal(b.module, state)
    assert b.weights.source == "cache"
    assert b.weights.sha256 == _sha256(snapshot / "model.safetensors")
    assert b.weights.tag == "lamb_in1k"
