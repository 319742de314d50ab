"""Pretrained weights in `tk finetune`: the torch cache, the store's imported weights, the
offline message, and what --freeze does to them (real resnet18 architecture, small data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.model.loading import load_model

SMALL = ["--opt", "dataset.samples=40", "--opt", "dataset.image_size=32", "--image-size",
         "32", "--batch-size", "10", "--epochs", "1", "--classes", "2", "--lr", "0.01"]
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's file name for IMAGENET1K_V1


def tk(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """conftest's environment without the test plugin."""
    env.pop("TK_PLUGINS", None)
    return env


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A resnet18 state dict (seeded random init, with non-trivial BatchNorm statistics)
    saved the way torchvision ships it."""
    import torch
    import torchvision

    torch.manual_seed(1234)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / RESNET18_FILE
    torch.save(model.state_dict(), path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def _backbone_tensors(store: Path, name: str) -> dict:

    model = load_model(name, store).model
    return {k[len("backbone."):]: v for k, v in model.state_dict().items()
            if k.startswith("backbone.")}


def _place_in_cache(env: dict[str, str], weights: Path) -> None:
    cache = Path(env["TORCH_HOME"]) / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / RESNET18_FILE).write_bytes(weights.read_bytes())


def test_freeze_all_keeps_cached_weights_bit_for_bit(env, tmp_path, resnet18_weights):
    path, reference = resnet18_weights
    _place_in_cache(env, path)
    proc = tk(["finetune", "--backbone", "resnet18", "--freeze", "all", "--name", "frozen",
               *SMALL], env)
    assert proc.returncode == 0, proc.stderr
    assert "weights: cache" in proc.stderr
    backbone = _backbone_tensors(tmp_path / "store", "frozen")
    assert backbone, "no backbone tensors"
    for key, value in backbone.items():
        assert value.equal(reference[key]), f"{key} changed under --freeze all"
    # BatchNorm running statistics too (they are in the state dict)
    assert any(k.endswith("running_mean") for k in backbone)

    from model_store import ModelStore

    meta = ModelStore(tmp_path / "store").show("frozen")
    import hashlib

    assert meta["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["weights"]["source"] == "cache"
    assert meta["file"].get("base_path"), "a frozen backbone is stored once, as a base"


def test_freeze_none_changes_the_backbone(env, tmp_path, resnet18_weights):
    path, reference = resnet18_weights
    _place_in_cache(env, path)
    proc = tk(["finetune", "--backbone", "resnet18", "--freeze", "none", "--name", "open",
               *SMALL], env)
    assert proc.returncode == 0, proc.stderr
    backbone = _backbone_tensors(tmp_path / "store", "open")
    changed = [k for k, v in backbone.items() if not v.equal(reference[k])]
    assert any(k.endswith("weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)  # BN layers trained


def test_offline_without_weights_is_one_clear_line(env):
    proc = tk(["finetune", "--backbone", "resnet18", *SMALL], env)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert RESNET18_FILE in err
    assert "https://download.pytorch.org/models/" + RESNET18_FILE in err
    assert "tk store import-weights" in err
    assert "epoch" not in err  # stopped before training


def test_import_weights_then_finetune_offline(env, tmp_path, resnet18_weights):
    path, reference = resnet18_weights
    proc = tk(["store", "import-weights", "resnet18", str(path)], env)
    assert proc.returncode == 0, proc.stderr
    assert not (Path(env["TORCH_HOME"]) / "hub").exists()  # nothing in the torch cache
    proc = tk(["finetune", "--backbone", "resnet18", "--freeze", "all", "--name", "imp",
               *SMALL], env)
    assert proc.returncode == 0, proc.stderr
    assert "weights: store" in proc.stderr
    backbone = _backbone_tensors(tmp_path / "store", "imp")
    assert all(v.equal(reference[k]) for k, v in backbone.items())


def test_weights_file_option(env, tmp_path, resnet18_weights):
    path, reference = resnet18_weights
    proc = tk(["finetune", "--backbone", "resnet18", "--freeze", "all", "--weights", str(path),
               "--name", "wf", *SMALL], env)
    assert proc.returncode == 0, proc.stderr
    assert "weights: file" in proc.stderr
    backbone = _backbone_tensors(tmp_path / "store", "wf")
    assert all(v.equal(reference[k]) for k, v in backbone.items())
