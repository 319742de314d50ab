"""`tk finetune` through the real command: training, saving, determinism, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.model.loading import load_model

HERE = Path(__file__).resolve().parent
TINY = str(HERE / "plugins_for_tests" / "tiny.py")
KILLER = str(HERE / "plugins_for_tests" / "killer.py")
# CPU: exact repeatability is a CPU promise (cuDNN kernels are not deterministic)
SMALL = ["--opt", "dataset.samples=120", "--opt", "dataset.image_size=32", "--batch-size", "16",
         "--device", "cpu"]


def tk(args: list[str], env: dict[str, str], check: bool = True,
       timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "toolkit", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tk {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_finetune_tiny_saves_model_plots_and_summary(env: dict[str, str], tmp_path: Path):
    proc = tk(["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--epochs", "2",
               "--no-pretrained", "--name", "m1", "--json", *SMALL], env)
    result = json.loads(proc.stdout)
    assert result["name"] == "m1"
    assert len(result["history"]) == 2
    for key in ("train_loss", "val_loss", "val_acc", "train_acc", "lr", "images_per_s"):
        assert key in result["history"][0]
    assert "saved model 'm1'" in proc.stderr and "best epoch" in proc.stderr
    for png in result["artifacts"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


    loaded = load_model("m1", tmp_path / "store", plugins=_plugins())
    assert loaded.classes == ["circle", "triangle", "square"]
    assert loaded.meta["metrics"]["best_epoch"] in (1, 2)
    assert loaded.meta["training"]["epochs"] == 2
    assert loaded.data_config.input_size == (3, 32, 32)


def _plugins():
    from toolkit.plugin.manager import load_plugins

    return load_plugins(modules=[TINY], env={})


def test_same_seed_same_metrics(env: dict[str, str], tmp_path: Path):
    """Same seed twice, once in the main process and once with two (persistent) DataLoader
    workers: augmentation is seeded per sample, so the runs are identical."""
    runs = []
    for i, workers in enumerate(("0", "2")):
        proc = tk(["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--epochs", "2",
                   "--no-pretrained", "--seed", "7", "--name", f"s{i}", "--json",
                   "--workers", workers, *SMALL], env)
        hist = json.loads(proc.stdout)["history"]
        runs.append([{k: v for k, v in m.items() if k not in ("images_per_s", "epoch_time")}
                     for m in hist])
    assert runs[0] == runs[1]
    a = tensors(tmp_path / "store" / "models" / "s0.safetensors")
    b = tensors(tmp_path / "store" / "models" / "s1.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_kill_then_resume_matches_uninterrupted_run(env: dict[str, str], tmp_path: Path):
    common = ["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--epochs", "3",
              "--no-pretrained", "--seed", "3", "--freeze", "1", "--unfreeze-at", "2",
              "--opt", "head.dropout=0.3", *SMALL]
    tk([*common, "--name", "straight"], env)

    killed = tk(["--plugin", KILLER, *common, "--name", "crashy"],
                {**env, "TK_TEST_KILL_AT": "2"}, check=False)
    assert killed.returncode == -9  # SIGKILL at the end of epoch 2
    models = tmp_path / "store" / "models"
    assert not (models / "crashy.safetensors").exists()
    checkpoint = tmp_path / "store" / "runs" / "crashy" / "checkpoint.safetensors"
    from toolkit.train.checkpoint import load_checkpoint

    saved = load_checkpoint(checkpoint)  # epoch 1's: the best epoch is the current one
    assert saved["state"]["epoch"] == 1 and saved["state"]["best_epoch"] == 1
    assert saved["best"] == {}  # so its weights are stored once, not twice

    resumed = tk([*common, "--name", "crashy", "--resume"], env)
    assert "resuming after epoch 1" in resumed.stderr
    a, b = tensors(models / "straight.safetensors"), tensors(models / "crashy.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), "resumed weights differ from the straight run"


def test_bf16_mixed_precision_trains_on_cpu(env: dict[str, str]):
    proc = tk(["finetune", "--backbone", "tiny-cnn", "--classes", "2", "--epochs", "1",
               "--no-pretrained", "--precision", "bf16-mixed", "--name", "bf", "--json",
               *SMALL], env)
    m = json.loads(proc.stdout)["metrics"]
    assert m["train_loss"] == m["train_loss"]  # finite, not NaN
    assert "precision bf16-mixed" in proc.stderr


def test_config_file_and_opt(env: dict[str, str], tmp_path: Path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('backbone = "tiny-cnn"\nclasses = 3\nepochs = 1\npretrained = false\n'
                   'batch-size = 16\n[head]\nname = "mlp"\nhidden = 16\n'
                   '[dataset]\nsamples = 90\nimage_size = 32\n')
    proc = tk(["finetune", "--config", str(cfg), "--opt", "head.dropout=0.5",
               "--name", "cfg", "--json"], env)
    assert json.loads(proc.stdout)["name"] == "cfg"
    from model_store import ModelStore

    spec = ModelStore(tmp_path / "store").show("cfg")["spec"]
    assert spec["head"]["name"].endswith("mlp")
    assert spec["head"]["options"] == {"hidden": 16, "dropout": 0.5}


@pytest.mark.parametrize("args, message", [
    (["--classes", "4", "--data", "{data}"], "has 2 classes (a, b)"),
    (["--classes", "3", "--head", "lineer"], "did you mean 'linear'"),
    (["--classes", "3", "--opt", "head.hiden=3"], "has no option 'hiden'"),
    (["--classes", "3", "--epochs", "-1"], "--epochs must be positive"),
    (["--classes", "3", "--freeze", "9"], "only 2 layer groups"),
    (["--classes", "3", "--device", "cuda"], "no CUDA GPU"),
    (["--classes", "3", "--config", "{missing}"], "no such file"),
])
def test_user_errors_are_one_line(env: dict[str, str], tmp_path: Path, args: list[str],
                                  message: str, make_image_dir):
    data = make_image_dir({"a": 3, "b": 3})
    args = [a.format(data=data, missing=tmp_path / "nope.toml") for a in args]
    proc = tk(["finetune", "--backbone", "tiny-cnn", "--no-pretrained", *args], env,
              check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_imagefolder_data(env: dict[str, str], make_image_dir):
    data = make_image_dir({"cat": 6, "dog": 6, "eel": 6}, size=(40, 40), ext="jpg")
    proc = tk(["finetune", "--backbone", "tiny-cnn", "--data", str(data), "--epochs", "2",
               "--no-pretrained", "--name", "folder", "--json", "--batch-size", "8",
               "--val-split", "0.34"], env)
    result = json.loads(proc.stdout)
    assert result["history"][-1]["val_samples"] == 6.0  # stratified: 2 per class


def test_resume_with_other_settings_is_a_user_error(env: dict[str, str]):
    common = ["finetune", "--backbone", "tiny-cnn", "--classes", "3", "--epochs", "3",
              "--no-pretrained", "--name", "moved", *SMALL]
    killed = tk(["--plugin", KILLER, *common], {**env, "TK_TEST_KILL_AT": "2"}, check=False)
    assert killed.returncode == -9
    proc = tk([*common, "--head", "mlp", "--resume"], env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "was made with another model (head: 'heads:linear' then, 'heads:mlp' now)" \
        in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # refused before the set-up line


def test_checkpoint_stores_only_the_best_weights_that_differ():
    """The best epoch's weights go into a checkpoint only where they differ from the
    model's current ones (a frozen backbone, or the last epoch being the best, costs
    nothing twice); reading it back gives the full best state."""
    import torch

    from toolkit.train.progress import Progress

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    progress = Progress()
    metrics = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
               "val_acc": 0.5}
    assert progress.record(1, metrics, torch.zeros(2, 2, dtype=torch.long), model)
    with torch.no_grad():
        model[1].weight.add_(1.0)  # epoch 2 changes the head only, and is not better
    progress.record(2, dict(metrics, epoch=2, val_acc=0.4), torch.zeros(2, 2), model)
    state, best = progress.to_checkpoint(model.state_dict())
    assert set(best) == {"1.weight"}
    back = Progress.from_checkpoint(state, best, model.state_dict(), epochs=3, num_classes=2)
    assert back.best_epoch == 1 and back.since_best == 1
    assert all(back.best_state[k].equal(progress.best_state[k]) for k in back.best_state)
