"""Scale: DDP under torchrun on the CPU (gloo) and the frozen-backbone feature cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from toolkit.testing import run_tk

HERE = Path(__file__).resolve().parent
TINY = str(HERE / "plugins_for_tests" / "tiny.py")
KILLER = str(HERE / "plugins_for_tests" / "killer.py")
# fully frozen (BatchNorm statistics fixed), no augmentation, no dropout: one process with
# batch 16 and two with 8 each see the same global batches, so they must agree closely.
COMPARABLE = ["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--epochs", "2",
              "--no-pretrained", "--freeze", "all", "--no-augment", "--no-cache-features",
              "--opt", "dataset.samples=150", "--opt", "dataset.image_size=32", "--seed", "5",
              "--lr", "0.05", "--json"]


def run(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``tk ARGS`` under torchrun with two processes (stopped with their stacks on stderr if
    they hang: :func:`toolkit.testing.run_tk`)."""
    return run_tk(*args, home=env["TK_HOME"], env=env, nproc=2, timeout=300)


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time: 2 cores
@pytest.mark.flaky(reruns=1)  # a rare rendezvous hang of torchrun on a loaded machine
def test_torchrun_two_processes_match_single_process(env: dict[str, str], tmp_path: Path):
    single = run([sys.executable, "-m", "toolkit", *COMPARABLE, "--batch-size", "16",
                  "--name", "single"], env)
    assert single.returncode == 0, single.stderr
    ddp = torchrun([*COMPARABLE, "--batch-size", "8", "--name", "ddp"], env)
    assert ddp.returncode == 0, ddp.stderr

    one = json.loads(single.stdout)
    two = json.loads(ddp.stdout.strip().splitlines()[-1])  # only rank 0 prints
    assert ddp.stdout.count('"name"') == 1
    models = sorted(p.name for p in (tmp_path / "store" / "models").iterdir())
    assert models == ["ddp.safetensors", "single.safetensors"]  # one model from the DDP job
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["val_samples"] == a["val_samples"] == 30.0  # the whole validation set
        # tolerance: float summation order differs; at most one validation image may flip
        assert abs(a["val_acc"] - b["val_acc"]) <= 1 / 30 + 1e-9
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-3
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3
    assert ddp.stderr.count("saved model") == 1  # rank 0 alone logs and saves


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time: 2 cores
@pytest.mark.flaky(reruns=1)  # a rare rendezvous hang of torchrun on a loaded machine
def test_torchrun_gradual_unfreezing_rewraps_ddp(env: dict[str, str], tmp_path: Path):
    """When a layer group thaws the trainable set changes and DDP is rewrapped (around
    the same, possibly compiled, module); both ranks go on in step and rank 0 saves."""
    ddp = torchrun(["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--epochs", "2",
                    "--no-pretrained", "--freeze", "1", "--unfreeze-at", "2", "-q",
                    "--opt", "dataset.samples=60", "--opt", "dataset.image_size=32",
                    "--batch-size", "8", "--name", "thaw", "--json"], env)
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stderr.count("unfroze backbone layer groups 1..1") == 1  # rank 0 logs
    history = json.loads(ddp.stdout.strip().splitlines()[-1])["history"]
    assert [m["epoch"] for m in history] == [1, 2]
    assert (tmp_path / "store" / "models" / "thaw.safetensors").exists()


def test_a_failing_rank_ends_the_job(env: dict[str, str]):
    args = ["--plugin", KILLER, "finetune", "--backbone", "tiny-cnn", "--classes", "3",
            "--epochs", "3", "--no-pretrained", "--opt", "dataset.samples=60",
            "--opt", "dataset.image_size=32", "--name", "dies"]
    proc = torchrun(args, {**env, "TK_TEST_KILL_AT": "1", "TK_DIST_TIMEOUT": "60"})
    assert proc.returncode != 0
    assert "epoch 2/3" not in proc.stderr


def _epochs(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["history"]


def test_feature_cache_used_reused_invalidated_and_as_accurate(env: dict[str, str],
                                                              tmp_path: Path):
    base = ["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--epochs", "3",
            "--no-pretrained", "--freeze", "all", "--no-augment", "--seed", "2",
            "--opt", "dataset.samples=150", "--opt", "dataset.image_size=32", "--json",
            "--lr", "0.05"]
    tk = [sys.executable, "-m", "toolkit"]
    cache_dir = tmp_path / "store" / "cache" / "features"
    cache_dir.mkdir(parents=True)
    stale = cache_dir / ".tk-tmp-999999-dead-x.safetensors"  # a killed writer's
    stale.write_bytes(b"partial")
    first = run([*tk, *base, "--name", "c1"], env)
    assert "feature cache: computed" in first.stderr
    assert not stale.exists()  # gone with the next successful write
    cached = _epochs(first)
    second = run([*tk, *base, "--name", "c2"], env)
    assert "feature cache: using" in second.stderr
    assert _epochs(second) == [dict(m, epoch_time=m2["epoch_time"],
                                    images_per_s=m2["images_per_s"])
                               for m, m2 in zip(cached, _epochs(second), strict=True)]
    plain = _epochs(run([*tk, *base, "--no-cache-features", "--name", "c3"], env))
    for a, b in zip(cached, plain, strict=True):
        assert abs(a["val_acc"] - b["val_acc"]) <= 1 / 30 + 1e-9
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3
    # other data (a different dataset seed): the old entry is invalidated
    third = run([*tk, *base, "--opt", "dataset.seed=9", "--name", "c4"], env)
    assert "feature cache: invalidated" in third.stderr
    files = list((tmp_path / "store" / "cache" / "features").glob("*.safetensors"))
    assert len(files) == 1


WRITE_CACHE = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    import torch
    from toolkit.train import features
    cache = Path(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # writes past 4 KB fail
    tensors = {"train_x": torch.zeros(64, 64), "train_y": torch.zeros(64, dtype=torch.long)}
    print(features._write(cache / "k.safetensors", tensors, cache, "slot", "k"))
""")


def test_feature_cache_write_failure_keeps_features_in_memory(tmp_path: Path):
    """A disk that refuses the cache (a real file-size limit: 16 KB of features past 4 KB)
    is not fatal, and the atomic writer leaves no temp file; a folder in the way neither."""
    cache = tmp_path / "cache"
    proc = run([sys.executable, "-c", WRITE_CACHE, str(cache)],
               {**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert list(cache.iterdir()) == []  # neither the entry nor a temp file
    import torch

    from toolkit.train import features

    blocked = tmp_path / "file"
    blocked.write_text("x")
    tensors = {"train_x": torch.zeros(2, 3)}
    assert features._write(blocked / "k.safetensors", tensors, blocked / "c", "s", "k") is False


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time: 2 cores
@pytest.mark.flaky(reruns=1)  # a rare rendezvous hang of torchrun on a loaded machine
def test_torchrun_feature_cache_is_computed_by_all_ranks_and_matches(env: dict[str, str],
                                                                   tmp_path: Path):
    """Under torchrun every rank computes a share of the features; the gathered cache is the
    one a single process computes, so a later single-process run reuses it."""
    args = ["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--epochs", "2",
            "--no-pretrained", "--freeze", "all", "--no-augment", "--seed", "4",
            "--opt", "dataset.samples=93", "--opt", "dataset.image_size=32", "--json"]
    ddp = torchrun([*args, "--batch-size", "8", "--name", "dc"], env)
    assert ddp.returncode == 0, ddp.stderr
    assert "feature cache: computed 93 feature vectors over 2 processes" in ddp.stderr
    single = run([sys.executable, "-m", "toolkit", *args, "--batch-size", "16",
                  "--name", "sc"], env)
    assert single.returncode == 0, single.stderr
    assert "feature cache: using" in single.stderr  # same key, same tensors
    one = json.loads(single.stdout)["history"]
    two = json.loads(ddp.stdout.strip().splitlines()[-1])["history"]
    for a, b in zip(one, two, strict=True):
        assert a["val_samples"] == b["val_samples"]
        assert abs(a["val_acc"] - b["val_acc"]) <= 1 / a["val_samples"] + 1e-9
