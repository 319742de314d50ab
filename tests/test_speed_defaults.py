"""The defaults tk picks for the machine (toolkit/devices.py, issue 15): ``--precision
auto``, ``--channels-last`` auto, training ``--workers`` auto, and ``tk infer --decode auto``
(reduced-size JPEG decoding only of files at least twice the size the model needs)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_PLUGIN
from torch import nn

from toolkit import devices

REPO = Path(__file__).resolve().parents[1]
BASE = ["--opt", "dataset.samples=60", "--opt", "dataset.image_size=32", "--batch-size", "16",
        "--device", "cpu", "--no-pretrained"]
SMALL = [*BASE, "--epochs", "1"]


KILLER = str(REPO / "tests" / "plugins_for_tests" / "killer.py")


def tk(args: list[str], tmp_path: Path, check: bool = True, **env_extra: str
       ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TK_DEBUG", "TK_PLUGINS")}
    env.update(TK_HOME=str(tmp_path / "home"), TORCH_HOME=str(tmp_path / "torch"),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), **env_extra)
    proc = subprocess.run([sys.executable, "-m", "toolkit", "--plugin", TINY_PLUGIN, *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc


def photo_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Photo-like JPEGs written with Pillow: a lit gradient, overlapping shapes in many
    colours, blur and sensor noise, quality 75-95."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    out = []
    for i in range(n):
        c0 = [rng.randint(0, 255) for _ in range(3)]
        c1 = [rng.randint(0, 255) for _ in range(3)]
        img = Image.linear_gradient("L").resize((w, h)).rotate(rng.uniform(0, 360))
        img = Image.composite(Image.new("RGB", (w, h), tuple(c0)),
                              Image.new("RGB", (w, h), tuple(c1)), img)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.randint(0, w), rng.randint(0, h)
            r = rng.randint(w // 20, w // 3)
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            if rng.random() < 0.5:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            else:
                draw.polygon([(x + rng.randint(-r, r), y + rng.randint(-r, r))
                              for _ in range(3)], fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2)))
        noise = Image.effect_noise((w, h), rng.uniform(5, 20)).convert("RGB")
        img = Image.blend(img, noise, 0.1)
        path = folder / f"photo_{i:03d}.jpg"
        img.save(path, quality=rng.randint(75, 95))
        out.append(path)
    return out


# -- precision ------------------------------------------------------------------------

def test_precision_auto_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"sse2", "avx512_bf16"}))
    assert devices.native_bf16(cpu) and devices.resolve_precision("auto", cpu) == "bf16-mixed"
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"sse2", "amx_bf16"}))
    assert devices.resolve_precision("auto", cpu) == "bf16-mixed"
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"sse2", "avx512f"}))
    assert not devices.native_bf16(cpu) and devices.resolve_precision("auto", cpu) == "32"
    assert devices.resolve_precision("bf16-mixed", cpu) == "bf16-mixed"  # given: kept
    assert not devices.native_bf16(torch.device("meta"))
    with pytest.raises(devices.TkError, match="expected one of auto, 32"):
        devices.resolve_precision("fp8", cpu)


def test_cpu_flags_are_read_from_cpuinfo():
    flags = devices.cpu_flags()
    if Path("/proc/cpuinfo").is_file() and "flags" in Path("/proc/cpuinfo").read_text():
        assert "fpu" in flags or "sse2" in flags
    assert isinstance(flags, frozenset)


# -- channels-last ----------------------------------------------------------------------

class ViTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)  # a patch embedding, not a convolution
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def test_channels_last_auto_is_on_for_convolutions_only():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    cpu, mps = torch.device("cpu"), torch.device("mps")
    assert devices.is_convolutional(cnn) and not devices.is_convolutional(ViTLike())
    assert devices.resolve_channels_last(None, cnn, cpu) is True
    assert devices.resolve_channels_last(None, ViTLike(), cpu) is False
    assert devices.resolve_channels_last(None, cnn, mps) is False
    assert devices.resolve_channels_last(False, cnn, cpu) is False  # forced wins
    assert devices.resolve_channels_last(True, ViTLike(), cpu) is True


# -- workers ----------------------------------------------------------------------------

def test_training_workers_are_bounded_by_cores_fds_and_memory(monkeypatch):
    import resource

    monkeypatch.setattr(devices, "usable_cpus", lambda: 16)
    monkeypatch.setattr(devices, "_available_memory", lambda: 64 << 30)
    unlimited = {resource.RLIMIT_NOFILE: (65536, 65536),
                 resource.RLIMIT_FSIZE: (resource.RLIM_INFINITY, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: unlimited[which])
    assert devices.train_workers() == 4
    assert devices.train_workers(world_size=8) == 2
    monkeypatch.setattr(devices, "usable_cpus", lambda: 1)
    assert devices.train_workers() == 1
    monkeypatch.setattr(devices, "usable_cpus", lambda: 16)
    limits = dict(unlimited)
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits[which])
    limits[resource.RLIMIT_NOFILE] = (100, 100)  # ulimit -n 100
    assert devices.train_workers() == 0
    limits[resource.RLIMIT_NOFILE] = (65536, 65536)
    limits[resource.RLIMIT_FSIZE] = (20_000, 20_000)  # ulimit -f: shared-memory batches fail
    assert devices.train_workers() == 0
    limits[resource.RLIMIT_FSIZE] = unlimited[resource.RLIMIT_FSIZE]
    monkeypatch.setattr(devices, "_available_memory", lambda: 1100 << 20)
    assert devices.train_workers() == 2


# -- tk finetune: chosen, printed, recorded ----------------------------------------------

def test_finetune_defaults_are_printed_and_recorded(tmp_path: Path):
    from toolkit.model.loading import load_model
    from toolkit.plugin.manager import load_plugins

    auto = tk(["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--name", "auto",
               *SMALL], tmp_path)
    given = tk(["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--name", "given",
                "--precision", "32", "--no-channels-last", "--workers", "0", *SMALL], tmp_path)
    plugins = load_plugins(modules=[TINY_PLUGIN], env={})
    expected = "bf16-mixed" if devices.native_bf16(torch.device("cpu")) else "32"
    meta = load_model("auto", tmp_path / "home", plugins=plugins).meta["training"]
    assert meta["precision"] == expected and meta["channels_last"] is True
    assert meta["workers"] == devices.train_workers()
    assert meta["auto"] == ["precision", "channels_last", "workers"]
    assert (f"precision {expected} (auto), channels-last on (auto), "
            f"{meta['workers']} workers (auto)") in auto.stderr
    meta = load_model("given", tmp_path / "home", plugins=plugins).meta["training"]
    assert (meta["precision"], meta["channels_last"], meta["workers"], meta["auto"]) == (
        "32", False, 0, [])
    assert "precision 32, channels-last off, 0 workers" in given.stderr


@pytest.mark.slow
def test_bf16_channels_last_runs_repeat_and_resume_exactly(tmp_path: Path):
    """Forced bf16 + channels-last (what auto picks on a bf16 CPU; the default tests cover
    it only where the CPU has bf16): same seed, with and without workers, and a run stopped
    after epoch 1 then resumed, all give the same weights bit for bit."""
    from safetensors.torch import load_file

    common = ["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--seed", "5",
              "--precision", "bf16-mixed", "--channels-last", *BASE, "--epochs", "2", "-q"]
    tk([*common, "--workers", "0", "--name", "a"], tmp_path)
    tk([*common, "--workers", "2", "--name", "b"], tmp_path)
    killed = tk(["--plugin", KILLER, *common, "--workers", "2", "--name", "c"], tmp_path,
                check=False, TK_TEST_KILL_AT="2")
    assert killed.returncode == -9  # SIGKILL at the end of epoch 2: epoch 1 checkpointed
    tk([*common, "--workers", "2", "--name", "c", "--resume"], tmp_path)
    models = tmp_path / "home" / "models"
    a, b, c = (load_file(str(models / f"{n}.safetensors")) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(a[k].equal(b[k]) for k in a), "workers changed a bf16 run"
    assert all(a[k].equal(c[k]) for k in a), "a resumed bf16 run differs"


# -- tk infer --decode auto -------------------------------------------------------------

def test_decode_auto_drafts_only_files_twice_the_size_needed(tmp_path: Path):
    from toolkit.data.batches import Preparer
    from toolkit.data.decode import load_image
    from toolkit.data.transforms import EvalTransform
    from toolkit.model.backbone import DataConfig

    tf = EvalTransform(DataConfig(input_size=(3, 64, 64), crop_pct=0.875))  # resize to 73
    big = photo_jpegs(tmp_path / "big", 3, (600, 450))  # 450 >= 2 x 2 x 73: drafted
    small = photo_jpegs(tmp_path / "small", 3, (240, 180), seed=1)  # 180 < 292: exact
    auto, exact = Preparer(tf, "auto"), Preparer(tf, "pil")
    assert auto.draft_size == 146 and exact.draft_size is None
    for p in big:
        assert load_image(p, draft_size=auto.draft_size).size == (300, 225)  # 1/2, not 1/4
        a, e = auto(str(p))[1], exact(str(p))[1]
        assert a.shape == e.shape == (64, 64, 3)
        diff = abs(a.astype(int) - e.astype(int))
        assert 0 < diff.mean() < 4
    for p in small:
        assert (auto(str(p))[1] == exact(str(p))[1]).all()


def test_infer_default_decoding_agrees_with_exact_decoding(tmp_path: Path, colour_model):
    store, name = colour_model
    photos = tmp_path / "photos"
    photo_jpegs(photos, 24, (480, 360), seed=2)
    photo_jpegs(photos / "small", 6, (120, 90), seed=3)

    def rows(*extra: str) -> dict[str, str]:
        proc = tk(["infer", str(photos), "--store", str(store), "--model", name,
                   "--format", "jsonl", "--device", "cpu", "-q", *extra], tmp_path)
        return {r["path"]: r["label"] for r in map(json.loads, proc.stdout.splitlines())}

    default, exact = rows(), rows("--decode", "pil")
    assert len(default) == len(exact) == 30
    agree = sum(default[p] == exact[p] for p in exact) / len(exact)
    assert agree >= 0.995
