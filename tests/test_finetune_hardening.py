"""`tk finetune` against a hostile but realistic user (issue 12, the training items): config
files that never end or lie about their types, components too large to build, settings
that cannot train, a NaN loss, an edited or foreign checkpoint, two runs with one name, a
store that cannot take the result. Every case goes through the real `tk` command in its own
process, under a timeout, so a hang fails instead of waiting; the answer is one
``tk: error: ...`` line and exit status 2, and nothing is saved.

The one-line cases run concurrently (two at a time) once per module, then each is checked
by its own test, like tests/test_user_errors.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TINY_PLUGIN, write_image

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
KILLER = str(HERE / "plugins_for_tests" / "killer.py")
PAUSER = str(HERE / "plugins_for_tests" / "pauser.py")
SMALL = ["--opt", "dataset.samples=60", "--opt", "dataset.image_size=32"]
FT_ANY_EPOCHS = ["--plugin", TINY_PLUGIN, "finetune", "--backbone", "tiny-cnn",
                 "--no-pretrained", "--classes", "3", "-q", "--device", "cpu"]
FT = [*FT_ANY_EPOCHS, "--epochs", "1"]
TIMEOUT = 120  # every command here ends in seconds; a hang fails the test


def tk_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TK_DEBUG", "TK_PLUGINS", "TK_MAX_MODEL_BYTES")}
    env.update(TK_HOME=str(home), TORCH_HOME=str(home / "torch"), HF_HOME=str(home / "hf"),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TK_DISABLE_PLUGINS="timm,torchvision",
               PYTHONPATH=str(REPO), **extra)
    return env


def tk(args: list[str], env: dict[str, str], cwd: Path = REPO, timeout: int = TIMEOUT
       ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit 2 and one ``tk: error:`` line, the last one (a run that got as far as its
    set-up lines, what it trains and its class counts, has printed those before)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("tk: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    assert errors[0].startswith("tk: error: "), proc.stderr
    assert all(line.startswith(("fine-tuning ", "train images per class: "))
               for line in lines[:-1]), proc.stderr
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def models_in(store: Path) -> list[str]:
    folder = store / "models"
    return sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []


# -- one-line refusals -----------------------------------------------------------------------

@dataclass
class Row:
    id: str
    args: list[str]
    expect: str
    files: dict[str, str] = field(default_factory=dict)  # name -> content ("" = special)
    env: dict[str, str] = field(default_factory=dict)
    epochs: list[str] = field(default_factory=lambda: ["--epochs", "1"])  # [] : not given


DEEP = "epochs = " + "[" * 100_000 + "]" * 100_000 + "\n"
ROWS = [
    # issue 12 item 10: unbounded reads and sizes
    Row("config-dev-zero", ["--config", "/dev/zero"], "--config /dev/zero: not a regular file"),
    Row("config-fifo", ["--config", "{fifo}"], "not a regular file (a pipe or a device)",
        files={"fifo": "<fifo>"}),
    Row("config-too-big", ["--config", "{big}"], "a config file may have at most 1048576 bytes",
        files={"big": "# padding\n" * 200_000}),
    Row("config-epochs-1e300", ["--config", "{c}"], "--epochs must be at most 100000",
        files={"c": "epochs = 1e300\n"}, epochs=[]),
    Row("image-size-huge", ["--image-size", "100000"], "--image-size must be at most 8192"),
    Row("head-layers-huge", ["--head", "mlp", "--opt", "head.layers=100000000"],
        "head 'heads:mlp' (layers=100000000) is too large"),
    Row("backbone-width-huge", ["--opt", "backbone.width=1000000"],
        "backbone 'tiny:tiny-cnn' (width=1000000) is too large: its parameters and buffers "
        "pass 1.0 MB", env={"TK_MAX_MODEL_BYTES": "1000000"}),
    # issue 12 item 11: internal errors where a user error belongs
    Row("config-options-int", ["--config", "{c}"], "unknown option(s) options",
        files={"c": "options = 1\n"}),
    Row("config-options-table", ["--config", "{c}"], "unknown option(s) options",
        files={"c": "[options]\nhidden = 3\n"}),
    Row("config-store-int", ["--config", "{c}"], "store = 5: expected a string",
        files={"c": "store = 5\n"}),
    Row("config-head-name-int", ["--config", "{c}"], "head = 5: expected a string",
        files={"c": "[head]\nname = 5\n"}),
    Row("config-deep-array", ["--config", "{c}"], "nested too deeply", files={"c": DEEP}),
    Row("opt-deep-array", ["--opt", "head.x=" + "[" * 200 + "]" * 200],
        "nested more than 32 levels deep"),
    Row("opt-dropout-nan", ["--opt", "head.dropout=nan"],
        "--opt head.dropout=nan: must be a finite number"),
    Row("batch-size-one", ["--batch-size", "1"],
        "--batch-size 1: a batch of 1 image reaches 2 BatchNorm layer(s) in training mode"),
    Row("nan-loss", ["--loss", "focal", "--opt", "loss.gamma=1e308"],
        "the validation loss became nan in epoch 1"),
    # issue 12 item 12: late failures are found before epoch 1
    Row("models-is-a-file", ["--store", "{store}"],
        "cannot use the model store's models folder at {store}/models: a file is in the way",
        files={"store/models": "not a folder"}),
]


def _prepare(row: Row, root: Path) -> tuple[list[str], str]:
    names = {}
    for name, content in row.files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "<fifo>":
            os.mkfifo(path)
        else:
            path.write_text(content)
        names[name.split("/")[0]] = str(root / name.split("/")[0])
    return [a.format(**names) for a in row.args], row.expect.format(**names)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    base = tmp_path_factory.mktemp("hardening")

    def one(row: Row) -> tuple[str, tuple]:
        root = base / row.id
        root.mkdir()
        args, expect = _prepare(row, root)
        home = root / "home"
        proc = tk([*FT_ANY_EPOCHS, *row.epochs, *SMALL, *args], tk_env(home, **row.env))
        return row.id, (proc, expect, home)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, ROWS))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_refused_with_one_line(results: dict[str, tuple], row: Row):
    proc, expect, home = results[row.id]
    assert_one_error(proc, expect)
    assert models_in(home) == []  # nothing saved
    assert not list(home.rglob(".tk-tmp-*"))


# -- an interrupted run and its checkpoint ----------------------------------------------------

def _image_data(root: Path, seed: int) -> Path:
    for label, colour in enumerate(((220, 30, 30), (30, 30, 220))):
        for i in range(6):
            shade = (colour[0], (colour[1] + 17 * i + 5 * seed) % 256, colour[2])
            write_image(root / f"c{label}" / f"{i}.png", (32, 32), shade)
    return root


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run on data A killed (SIGKILL) at the end of epoch 2 of 3: runs/base holds the
    checkpoint of epoch 1."""
    root = tmp_path_factory.mktemp("resume")
    data_a, data_b = _image_data(root / "a", 0), _image_data(root / "b", 1)
    home = root / "home"
    args = ["--plugin", TINY_PLUGIN, "finetune", "--backbone", "tiny-cnn", "--no-pretrained",
            "--epochs", "3", "-q", "--device", "cpu", "--batch-size", "4", "--val-split",
            "0.34", "--freeze", "1", "--unfreeze-at", "2"]
    killed = tk(["--plugin", KILLER, *args, "--data", str(data_a), "--name", "base"],
                tk_env(home, TK_TEST_KILL_AT="2"))
    assert killed.returncode == -9, killed.stderr
    return {"home": home, "args": args, "a": data_a, "b": data_b,
            "checkpoint": home / "runs" / "base" / "checkpoint.safetensors"}


def _edit(saved: dict, case: str) -> None:
    import torch

    state = saved["state"]
    if case == "epoch-huge":
        state["epoch"] = 10**12
    elif case == "epoch-negative":
        state["epoch"] = -5
    elif case == "history-not-a-list":
        state["history"] = 5
    elif case == "metric-not-a-number":
        state["history"][0]["val_acc"] = "high"
    elif case == "best-epoch-out-of-range":
        state["best_epoch"] = 7
    elif case == "confusion-not-counts":
        state["best_confusion"] = "x"
    elif case == "optimizer-lr-text":
        saved["optimizer"]["param_groups"][0]["lr"] = "fast"
    elif case == "optimizer-state-nan":
        entry = next(iter(saved["optimizer"]["state"].values()))
        entry["exp_avg"] = torch.full_like(entry["exp_avg"], float("nan"))
    elif case == "model-wrong-shape":
        key = next(iter(saved["model"]))
        saved["model"][key] = torch.zeros(1)
    elif case == "freezing-edited":
        saved["freezing"]["frozen"] = 7
    elif case == "format-unknown":
        saved["format"] = 99
    elif case == "keys-missing":
        del saved["optimizer"]
    else:
        raise AssertionError(case)


# through the real command: the cases issue 12 names (huge / negative epoch, type errors)
EDITS_TK = {
    "epoch-huge": "it is at epoch 1000000000000 but this run has --epochs 3",
    "epoch-negative": "epoch -5 is not a finished epoch",
    "history-not-a-list": "its history does not have one entry per epoch",
    "optimizer-lr-text": "its optimizer setting 'lr' is 'fast'",
    "model-wrong-shape": "it was made with other settings",
}
# in-process, against the same checkpoint: every other field
EDITS_UNIT = {
    "metric-not-a-number": "metric 'val_acc' of epoch 1 is not a finite number ('high')",
    "best-epoch-out-of-range": "best epoch 7 is not one of its epochs 1..1",
    "confusion-not-counts": "its confusion matrix is not 2 x 2 counts",
    "optimizer-state-nan": "its optimizer state 'exp_avg' is not a finite number or tensor",
    "freezing-edited": "its freezing state (frozen 7) does not match the schedule at epoch 1",
    "format-unknown": "has format 99, this tk reads 2",
    "keys-missing": "is not a tk training checkpoint",
    **EDITS_TK,
}


def test_resume_refuses_edited_checkpoints_and_other_data(interrupted: dict):
    """Issue 12 item 5: every field of a checkpoint (re-sealed after the edit, as a
    determined editor would) is checked for type and range before anything runs (an epoch
    of 10**12 does not hang the freeze replay); a checkpoint edited without re-sealing is
    damaged; other data with the same classes is refused. Each: one line, exit 2, no model,
    the checkpoint left as it was."""
    from toolkit.train.checkpoint import load_checkpoint, save_checkpoint

    home, base = interrupted["home"], interrupted["checkpoint"]
    runs = home / "runs"
    cases: dict[str, tuple[list[str], str]] = {}
    for case, expect in EDITS_TK.items():
        shutil.copytree(runs / "base", runs / case)
        saved = load_checkpoint(runs / case / "checkpoint.safetensors")
        _edit(saved, case)
        save_checkpoint(runs / case / "checkpoint.safetensors", saved)
        cases[case] = (["--data", str(interrupted["a"])], expect)
    shutil.copytree(runs / "base", runs / "unsealed")
    raw = bytearray((runs / "unsealed" / "checkpoint.safetensors").read_bytes())
    raw[-10] ^= 0xFF  # a flipped byte in the tensor data
    (runs / "unsealed" / "checkpoint.safetensors").write_bytes(bytes(raw))
    cases["unsealed"] = (["--data", str(interrupted["a"])], "is damaged (checksum mismatch")
    shutil.copytree(runs / "base", runs / "other-data")
    cases["other-data"] = (["--data", str(interrupted["b"])],
                           "was made with other data (dataset_options: ")
    before = {case: (runs / case / "checkpoint.safetensors").read_bytes() for case in cases}

    def resume(case: str) -> tuple[str, subprocess.CompletedProcess]:
        extra, _ = cases[case]
        return case, tk([*interrupted["args"], *extra, "--name", case, "--resume"],
                        tk_env(home))

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(pool.map(resume, cases))
    for case, proc in done.items():
        line = assert_one_error(proc, "--resume: the checkpoint", cases[case][1])
        assert case in line  # names the run's checkpoint
        assert (runs / case / "checkpoint.safetensors").read_bytes() == before[case], case
    assert models_in(home) == []
    assert base.exists()


@pytest.mark.parametrize("case", sorted(EDITS_UNIT))
def test_resume_checks_every_checkpoint_field(interrupted: dict, case: str, tmp_path: Path):
    """The same validation in-process (`Trainer.read_checkpoint` then the resume in
    `Trainer.fit`), for every field: one TkError naming what is wrong."""
    import torch

    from toolkit.errors import TkError
    from toolkit.model.assemble import ModelSpec, build_classifier
    from toolkit.model.freezing import Freezing
    from toolkit.testing import fresh_plugins
    from toolkit.train.checkpoint import load_checkpoint, save_checkpoint
    from toolkit.train.trainer import TrainConfig, Trainer

    saved = load_checkpoint(interrupted["checkpoint"])
    _edit(saved, case)
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, saved)
    plugins = fresh_plugins(TINY_PLUGIN)
    model, backbone = build_classifier(plugins, ModelSpec("tiny:tiny-cnn", 2))
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    opt = plugins.registry("optimizers").resolve("adamw").factory
    trainer = Trainer(model, Freezing(backbone, 1, 2), torch.nn.CrossEntropyLoss(), opt, data,
                      data, 2, TrainConfig(epochs=3, batch_size=4, quiet=True),
                      torch.device("cpu"), checkpoint=path,
                      run_identity=saved.get("run") if isinstance(saved, dict) else None,
                      log=lambda msg: None)
    with pytest.raises(TkError, match="^--resume: the checkpoint") as info:
        trainer.fit(resume=True, saved=trainer.read_checkpoint())
    assert EDITS_UNIT[case] in str(info.value)


def test_resume_from_another_folder_with_relative_paths(tmp_path: Path):
    """Issue 13 item 11: a relative dataset path is resolved before it is used, recorded
    and compared, so `--resume` from another working folder (with the path written
    relative to it) continues the same run; the metadata holds the absolute path."""
    _image_data(tmp_path / "work" / "data", 0)
    sub = tmp_path / "work" / "sub"
    sub.mkdir()
    home = tmp_path / "home"
    args = ["--plugin", TINY_PLUGIN, "finetune", "--backbone", "tiny-cnn", "--no-pretrained",
            "--epochs", "2", "-q", "--device", "cpu", "--batch-size", "4", "--val-split",
            "0.34", "--dataset", "imagefolder", "--name", "rel"]
    killed = tk(["--plugin", KILLER, *args, "--opt", "dataset.path=data"],
                tk_env(home, TK_TEST_KILL_AT="2"), cwd=tmp_path / "work")
    assert killed.returncode == -9, killed.stderr
    resumed = tk([*args, "--opt", "dataset.path=../data", "--resume"], tk_env(home), cwd=sub)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1 of 2" in resumed.stderr
    from model_store import ModelStore

    meta = ModelStore(home).show("rel")
    assert meta["training"]["dataset_options"]["path"] == str(tmp_path / "work" / "data")


# -- two runs, one name ---------------------------------------------------------------------

def test_second_run_with_the_same_name_is_refused_and_the_first_unharmed(tmp_path: Path):
    """Issue 12 item 6: while a run holds runs/NAME (paused at the end of its first epoch),
    a second `tk finetune --name NAME` (a fresh run, and a --resume) is refused at once;
    the first then finishes and saves its model."""
    home = tmp_path / "home"
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "--plugin", PAUSER, *FT, *SMALL, "--epochs", "2",
         "--name", "shared"], env=tk_env(home, TK_TEST_PAUSED=str(paused), TK_TEST_GO=str(go)),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not paused.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), "the first run never reached the end of epoch 1"
        for extra in ([], ["--resume"]):
            second = tk([*FT, *SMALL, "--epochs", "2", "--name", "shared", *extra],
                        tk_env(home))
            assert_one_error(second, "run 'shared' is in progress in another process")
        go.write_text("go")
        _, stderr = first.communicate(timeout=TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert "saved model 'shared'" in stderr
    assert models_in(home) == ["shared.safetensors"]
    assert not (home / "runs" / "shared").exists()  # checkpoint and lock gone with the run


def test_default_names_of_runs_started_together_do_not_collide(tmp_path: Path):
    """Default names have one-second resolution: a default name another run holds, or
    that a model already has, becomes NAME-2, NAME-3...; a name the user gave is refused."""
    from model_store import ModelStore
    from toolkit.errors import TkError
    from toolkit.train.finetune import Outputs
    from toolkit.train.rundir import RunDir

    store = ModelStore(tmp_path / "store")
    runs = store.root / "runs"
    store.models_dir.mkdir(parents=True)
    (store.models_dir / "m-2.safetensors").write_bytes(b"a finished model")
    with RunDir(runs, "m").lock():  # another run holds "m"
        chosen = Outputs(store, "m", RunDir(runs, "m"), True, default_name=True)
        with chosen.claim():
            assert chosen.name == "m-3" and (runs / "m-3" / ".lock").exists()
        given = Outputs(store, "m", RunDir(runs, "m"), True, default_name=False)
        with pytest.raises(TkError, match="run 'm' is in progress in another process"):
            with given.claim():
                pass
    assert not (runs / "m-3").exists()  # no checkpoint: the folder went with the lock


# -- a store that cannot take the result -----------------------------------------------------

@pytest.fixture
def read_only_store(tmp_path: Path):
    """A store on a read-only tmpfs (as root, chmod would not stop writes), when this
    machine lets the test mount one; skipped otherwise."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (mnt / "runs").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_store_is_refused_before_training(read_only_store: Path):
    """Issue 12 item 12: one line before the first epoch (before: after training)."""
    proc = tk([*FT, *SMALL, "--store", str(read_only_store)], tk_env(read_only_store.parent))
    assert_one_error(proc, "Read-only file system")
    assert "fine-tuning" not in proc.stderr


# -- what a saved model records ----------------------------------------------------------------

OBSERVER = '''
import json, os
from toolkit.plugin.hookspecs import hookimpl


def slow_sgd(param_groups, lr, weight_decay):
    import torch
    return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay)


@hookimpl
def tk_register_optimizers(register):
    register("slow-sgd", slow_sgd, default_lr=0.0123, description="SGD at its own lr")


@hookimpl
def tk_epoch_end(epoch, metrics):
    with open(os.environ["TK_TEST_EPOCHS"], "a") as fh:
        fh.write(json.dumps({"epoch": epoch, "type": type(epoch).__name__,
                             "metrics_epoch_type": type(metrics["epoch"]).__name__}) + "\\n")
'''


def test_saved_model_records_components_lr_and_int_epochs(tmp_path: Path):
    """Issue 13 items 5, 7, 8: the metadata names each component with its plugin and
    distribution; an optimizer's registered default_lr is used without --lr and recorded;
    `tk_epoch_end` gets the epoch as an int. A dead writer's temp file among the artifacts
    goes with the next successful write."""
    plugin = tmp_path / "acme_observer.py"
    plugin.write_text(OBSERVER)
    home = tmp_path / "home"
    stale = home / "artifacts" / "rec" / ".tk-tmp-999999-dead-curves.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a png")
    journal = tmp_path / "epochs.jsonl"
    proc = tk(["--plugin", str(plugin), *FT, *SMALL, "--epochs", "2", "--optimizer", "slow-sgd",
               "--name", "rec", "--json"], tk_env(home, TK_TEST_EPOCHS=str(journal)))
    assert proc.returncode == 0, proc.stderr
    assert "lr 0.0123" in proc.stderr
    from model_store import ModelStore

    meta = ModelStore(home).show("rec")
    components = meta["components"]
    assert set(components) == {"backbone", "head", "loss", "optimizer", "dataset"}
    assert components["optimizer"]["name"] == "acme_observer:slow-sgd"
    assert components["backbone"]["name"] == "tiny:tiny-cnn"
    assert components["head"]["plugin"] == "heads"
    assert components["head"]["distribution"]  # the built-ins come from tk's distribution
    for entry in components.values():
        assert set(entry) >= {"name", "plugin", "module", "distribution", "version"}
    assert meta["training"]["lr"] == 0.0123
    assert meta["training"]["lr_source"] == "default_lr of acme_observer:slow-sgd"
    assert [m["epoch"] for m in meta["metrics"]["history"]] == [1, 2]
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(e["epoch"], e["type"], e["metrics_epoch_type"]) for e in events] == [
        (1, "int", "int"), (2, "int", "int")]
    assert not stale.exists()
    assert (home / "artifacts" / "rec" / "curves.png").exists()


def test_finetune_args_reads_a_config_for_the_python_api(tmp_path: Path):
    """The --config merge is a library function: the file, then given values, then --opt."""
    from toolkit.errors import TkError
    from toolkit.train.config import finetune_args

    cfg = tmp_path / "run.toml"
    cfg.write_text('backbone = "tiny-cnn"\nepochs = 3\nbatch-size = 8.0\nfreeze = 1\n'
                   '[head]\nname = "mlp"\nhidden = 16\n')
    args = finetune_args({"epochs": 4, "lr": None}, opts=["head.hidden=32"], config=cfg)
    assert (args.backbone, args.epochs, args.batch_size, args.freeze) == ("tiny-cnn", 4, 8, "1")
    assert args.head == "mlp" and args.options["head"] == {"hidden": 32}
    assert args.lr is None  # chosen at run time: the optimizer's default_lr, else 1e-3
    for text, message in (("epochs = 2.5\n", "is not a valid integer"),
                          ("augment = 1\n", "expected true or false"),
                          ("seed = -1\n", "--seed must not be negative"),
                          ("lr = 1e9\n", "--lr must be at most 100")):
        cfg.write_text('backbone = "x"\n' + text)
        with pytest.raises(TkError, match=message):
            finetune_args({}, config=cfg)
