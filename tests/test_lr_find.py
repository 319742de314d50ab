"""`--lr auto` and `tk lr-find` (issue 16): the LR range test restores the model (training
with --lr auto equals training with the chosen lr given by hand), works in every freeze
mode and with the feature cache, and under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.testing import run_tk

HERE = Path(__file__).resolve().parent
TINY = str(HERE / "plugins_for_tests" / "tiny.py")

BASE = ["--backbone", "tiny-cnn", "--classes", "3", "--no-pretrained", "--opt",
        "dataset.samples=90", "--opt", "dataset.image_size=32", "--batch-size", "8",
        "--device", "cpu", "--workers", "0", "--lr-find-steps", "12", "-q"]


def tk(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_tk(*args, home=env["TK_HOME"], env=env, nproc=2, timeout=300)


def meta(name: str, env: dict[str, str]) -> dict:
    out = json.loads(tk(["store", "show", name, "--json"], env).stdout)
    return out.get("metadata", out)


def test_lr_auto_leaves_the_model_as_it_was(env: dict[str, str]) -> None:
    auto = tk(["finetune", *BASE, "--epochs", "2", "--lr", "auto", "--name", "auto",
               "--json"], env)
    assert auto.returncode == 0, auto.stderr
    assert "--lr auto: lr" in auto.stderr
    training = meta("auto", env)["training"]
    assert training["lr_source"] == "auto" and training["lr_find"]["steps"] == 12
    chosen = training["lr"]
    assert chosen == training["lr_find"]["suggestion"] and 1e-7 <= chosen <= 10
    by_hand = tk(["finetune", *BASE, "--epochs", "2", "--lr", repr(chosen), "--name", "hand",
                  "--json"], env)
    assert by_hand.returncode == 0, by_hand.stderr
    a, b = json.loads(auto.stdout)["history"], json.loads(by_hand.stdout)["history"]
    for x, y in zip(a, b, strict=True):  # the range test left no trace on training
        assert x["train_loss"] == y["train_loss"] and x["val_loss"] == y["val_loss"]


@pytest.mark.parametrize("freeze", ["all", "1"])
def test_lr_find_command_in_freeze_modes(env: dict[str, str], tmp_path: Path,
                                         freeze: str) -> None:
    proc = tk(["lr-find", *BASE, "--freeze", freeze, "--name", "probe", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert 1e-7 <= found["suggestion"] <= 10 and 1e-7 <= found["valley"] <= 10
    if found["passes"] <= 4:
        assert found["rule"] == "minimum/2" and found["suggestion"] == found["min_loss_lr"] / 2
    else:
        assert found["rule"] == "valley" and found["suggestion"] == found["valley"]
    assert Path(found["plot"]).is_file()
    assert not (tmp_path / "store" / "models" / "probe.safetensors").exists()  # nothing saved


def test_lr_auto_bad_value_is_one_line(env: dict[str, str]) -> None:
    proc = tk(["finetune", *BASE, "--lr", "fast"], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "auto" in proc.stderr


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time: 2 cores
@pytest.mark.flaky(reruns=1)  # a rare rendezvous hang of torchrun on a loaded machine
@pytest.mark.slow
def test_lr_auto_under_torchrun(env: dict[str, str], tmp_path: Path) -> None:
    proc = torchrun(["finetune", *BASE, "--epochs", "1", "--lr", "auto", "--freeze", "1",
                     "--unfreeze-at", "2", "--name", "ddp", "--json"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("--lr auto: lr") == 1  # rank 0 says it once
    assert meta("ddp", env)["training"]["lr_source"] == "auto"
