"""`tk finetune --log tensorboard|mlflow|csv`: what each logger writes, read back with the
logging library's own reader; unknown names and missing extras are one line; a logger that
fails is reported once and training goes on; the observers attached for a run are gone
after it."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_PLUGIN

from toolkit.plugin.hookspecs import hookimpl
from toolkit.testing import fresh_plugins, run_tk

# the built-in torchvision/timm plugins only slow the start-up of these runs down
FAST = {"TK_DISABLE_PLUGINS": "timm,torchvision", "MLFLOW_TRACKING_URI": ""}
SCALARS = {"train/loss", "train/acc", "val/loss", "val/acc", "opt/lr", "speed/images_per_s",
           "speed/epoch_time"}


def finetune(tmp_path: Path, data: Path, *args: str, env: dict[str, str] | None = None,
             plugins: tuple[str, ...] = (TINY_PLUGIN,)) -> Any:
    return run_tk("finetune", "--backbone", "tiny-cnn", "--data", str(data), "--no-pretrained",
                  "--epochs", "2", "--batch-size", "8", "--name", "run", "-q", *args,
                  home=tmp_path / "home", plugins=plugins, env={**FAST, **(env or {})},
                  cwd=tmp_path, timeout=300)


@pytest.fixture
def colours(make_image_dir: Any) -> Path:
    return make_image_dir({"red": 6, "green": 6, "blue": 6})


def test_every_logger_writes_every_epoch_and_the_plots(tmp_path: Path, colours: Path) -> None:
    """One run with the three built-in loggers; each store read back with its own reader."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = finetune(tmp_path, colours, "--log", "tensorboard", "--log", "mlflow", "--log", "csv",
                   "--log", "csv")
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr
    store = tmp_path / "home" / "tk"
    logs = store / "runs" / "run" / "logs"

    # TensorBoard: every epoch's scalars, the hyperparameters in the same run, the plots
    events = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert SCALARS <= set(tags["scalars"])
    for tag in SCALARS:
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert set(tags["images"]) == {"plots/curves", "plots/confusion"}
    image = events.Images("plots/curves")[0]
    assert image.width > 100 and image.encoded_image_string.startswith(b"\x89PNG")
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["backbone"].string_value == "tiny:tiny-cnn"
    assert start.hparams["epochs"].number_value == 2
    assert "config/text_summary" in tags["tensors"]

    # CSV: a row per epoch (--log csv twice is one logger)
    with open(logs / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "val_acc", "lr", "images_per_s"} <= set(rows[0])

    # MLflow: ./mlruns (a file store) holds the run: params, metrics, artifacts, tags
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tk")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["tk.model"] == "run" and run.data.tags["tk.version"]
    assert run.data.params["backbone"] == "tiny:tiny-cnn"
    assert run.data.params["epochs"] == "2" and float(run.data.params["lr"]) > 0
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/curves.png", "plots/confusion.png"}
    (model,) = client.list_artifacts(run.info.run_id, "model")
    assert model.path == "model/run.safetensors"
    # the artifact is a self-contained model file: a fresh store reads it whole
    from model_store import ModelStore

    copy = tmp_path / "other-store"
    (copy / "models").mkdir(parents=True)
    local = client.download_artifacts(run.info.run_id, model.path, str(tmp_path))
    shutil.copy(local, copy / "models" / "run.safetensors")
    theirs, ours = ModelStore(copy).read("run"), ModelStore(store).read("run")
    assert theirs.tensors.keys() == ours.tensors.keys()
    assert all(theirs.tensors[k].equal(ours.tensors[k]) for k in ours.tensors)


def test_unknown_logger_is_one_line(tmp_path: Path, colours: Path) -> None:
    out = finetune(tmp_path, colours, "--log", "tensorbaord")
    assert out.returncode == 2
    assert out.stderr == ("tk: error: unknown logger 'tensorbaord'; did you mean 'tensorboard'? "
                          "(see `tk list loggers`)\n")


@pytest.mark.parametrize("logger,package", [("tensorboard", "tensorboard"),
                                            ("mlflow", "mlflow")])
def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path, colours: Path, logger: str,
                                              package: str) -> None:
    blocker = tmp_path / "blocked"
    (blocker / package).mkdir(parents=True)
    (blocker / package / "__init__.py").write_text(
        f'raise ImportError("No module named {package!r}")\n')
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    out = finetune(tmp_path, colours, "--log", logger, env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tk: error: --log {logger} needs the "
                                                   f"{package} package")
    assert lines[0].endswith(f"pip install 'tk-microtoolkit[{logger}]'")
    assert not (tmp_path / "home" / "tk" / "models" / "run.safetensors").exists()


FLAKY = textwrap.dedent("""
    import json
    from pathlib import Path

    from toolkit.plugin.hookspecs import hookimpl


    class Flaky:
        def __init__(self, log_dir, run_name):
            self.out = Path(log_dir)
            self.out.mkdir(parents=True, exist_ok=True)

        def note(self, what):
            with open(self.out / "calls.txt", "a") as fh:
                fh.write(what + "\\n")

        @hookimpl
        def tk_train_start(self, config):
            self.note("start")

        @hookimpl
        def tk_epoch_end(self, epoch, metrics):
            self.note(f"epoch {epoch}")
            if epoch == 2:
                raise OSError("disk full")

        @hookimpl
        def tk_train_end(self, status):
            self.note(f"end {status}")


    @hookimpl
    def tk_register_loggers(register):
        register("flaky", Flaky)
    """)


def test_a_failing_logger_is_reported_once_and_training_goes_on(
        tmp_path: Path, colours: Path) -> None:
    """Also: a third-party logger, --log-dir from a --config file, --log on the command
    line replacing the file's list, MLFLOW_TRACKING_URI over --log-dir for MLflow."""
    from mlflow.tracking import MlflowClient

    plugin = tmp_path / "flakylog.py"
    plugin.write_text(FLAKY)
    config = tmp_path / "run.toml"
    config.write_text('log = ["tensorboard"]\nlog-dir = "my-logs"\n')
    tracking = (tmp_path / "tracking").as_uri()
    out = finetune(tmp_path, colours, "--epochs", "4", "--config", str(config),
                   "--log", "flaky", "--log", "csv", "--log", "mlflow",
                   plugins=(TINY_PLUGIN, str(plugin)),
                   env={"MLFLOW_TRACKING_URI": tracking, "MLFLOW_EXPERIMENT_NAME": "flaky",
                        "MLFLOW_ALLOW_FILE_STORE": "true"})
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    assert warnings == [f"tk: warning: logger 'flakylog:flaky' (--plugin {plugin}) failed in "
                        "tk_epoch_end: OSError: disk full; it is off for the rest of this run "
                        "(training goes on)"]
    logs = tmp_path / "my-logs" / "run"
    assert (logs / "calls.txt").read_text().split("\n")[:-1] == ["start", "epoch 1", "epoch 2"]
    with open(logs / "metrics.csv", newline="") as fh:  # the other logger saw every epoch
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2", "3", "4"]
    assert sorted(p.name for p in logs.iterdir()) == ["calls.txt", "metrics.csv"]
    # MLflow went where MLFLOW_TRACKING_URI says (not --log-dir, not ./mlruns)
    assert not (tmp_path / "mlruns").exists()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("flaky").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3,
                                                                                      4]
    assert (tmp_path / "home" / "tk" / "models" / "run.safetensors").is_file()
    assert not (tmp_path / "home" / "tk" / "runs" / "run").exists()


def test_an_unreachable_mlflow_server_is_one_line_before_training(tmp_path: Path,
                                                                  colours: Path) -> None:
    out = finetune(tmp_path, colours, "--log", "mlflow",
                   env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "tk: error: --log mlflow: cannot use the tracking store http://127.0.0.1:9 (")
    assert not (tmp_path / "home" / "tk" / "models").exists() or not any(
        (tmp_path / "home" / "tk" / "models").iterdir())


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (its own process group, ended after)."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "server"
    folder.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'db.sqlite'}",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "log", "w"),
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert server.poll() is None, (folder / "log").read_text()[-2000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_mlflow_logs_to_a_tracking_server(tmp_path: Path, colours: Path,
                                          mlflow_server: str) -> None:
    """MLFLOW_TRACKING_URI as a server URL: the run, its metrics and its artifacts (sent
    through the server) are there, and --json stays the only thing on stdout."""
    from mlflow.tracking import MlflowClient

    out = finetune(tmp_path, colours, "--log", "mlflow", "--json",
                   env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["name"] == "run"  # MLflow's "View run" line is not there
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("tk").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["tk.model"] == "run"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    artifacts = {a.path for folder in ("plots", "model")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {"plots/curves.png", "plots/confusion.png", "model/run.safetensors"}


# -- in-process: the manager's part ----------------------------------------------------------

class Journal:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def tk_epoch_end(self, epoch: int) -> None:
        self.calls.append(("epoch", epoch))

    @hookimpl
    def tk_train_end(self, name: str, status: str) -> None:
        self.calls.append((name, status))

    @hookimpl
    def tk_register_heads(self, register: Any) -> None:  # not an observer: left out
        raise AssertionError("never called")


def test_run_observers_attach_for_one_run_and_say_how_it_ended(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.train.observers import RunObservers

    journal = Journal()

    def factory(log_dir: str, run_name: str) -> Journal:
        assert log_dir == str(tmp_path / "runs" / "m" / "logs") and run_name == "m"
        return journal

    class Owner:
        @hookimpl
        def tk_register_loggers(self, register: Any) -> None:
            register("journal", factory)

    plugins = fresh_plugins(("owner", Owner()), builtins=False, strict=False)
    for status, error in (("finished", None), ("interrupted", KeyboardInterrupt),
                          ("failed", ValueError), ("stopped", RuntimeError)):
        journal.calls.clear()
        observers = RunObservers(plugins, ["journal", "journal"])
        assert len(observers.loggers) == 1
        def stop(epoch: int, metrics: Any, error: Any = error) -> None:
            raise error()

        callback = observers.epoch_callback(stop if status == "stopped" else None)
        with pytest.raises(error) if error else contextlib.nullcontext(), \
                observers.observing():
            observers.attach("m", tmp_path / "runs" / "m")
            assert plugins.records["owner:journal"].hooks == ["tk_epoch_end", "tk_train_end"]
            observers.start({})
            callback(1, {})
            if error is not None and status != "stopped":
                raise error()
        assert journal.calls == [("epoch", 1), ("m", status)]
        assert "owner:journal" not in plugins.records  # detached
        plugins.notify("tk_epoch_end", epoch=9, metrics={})
        assert ("epoch", 9) not in journal.calls
    assert "tk_register_heads is not an observer hook" in capsys.readouterr().err


def test_an_observer_plugin_failing_every_epoch_is_reported_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    class Grumpy:
        calls = 0

        @hookimpl
        def tk_epoch_end(self, epoch: int) -> None:
            Grumpy.calls += 1
            raise OSError(f"disk full at {epoch}")

    plugins = fresh_plugins(("grumpy", Grumpy()), builtins=False, strict=False)
    for epoch in (1, 2, 3):
        plugins.notify("tk_epoch_end", epoch=epoch, metrics={})
    err = capsys.readouterr().err
    assert Grumpy.calls == 3  # a plugin's observer keeps being called...
    assert err.count("tk: warning:") == 1 and "disk full at 1" in err  # ...reported once


def test_config_files_take_a_list_of_loggers(tmp_path: Path) -> None:
    from toolkit.errors import TkError
    from toolkit.train.config import finetune_args

    config = tmp_path / "run.toml"
    config.write_text('backbone = "x"\nlog = ["tensorboard", "csv"]\nlog_dir = "logs"\n')
    args = finetune_args({}, config=config)
    assert args.log == ["tensorboard", "csv"] and args.log_dir == "logs"
    assert finetune_args({"log": ["mlflow"]}, config=config).log == ["mlflow"]
    config.write_text('backbone = "x"\nlog = "csv"\n')
    assert finetune_args({}, config=config).log == ["csv"]
    config.write_text('backbone = "x"\nlog = [1]\n')
    with pytest.raises(TkError, match=r"log = \[1\]: expected a name or a list of names"):
        finetune_args({}, config=config)


def test_tk_list_loggers_shows_the_builtins(tmp_path: Path) -> None:
    out = run_tk("list", "loggers", "--json", home=tmp_path, env=FAST)
    assert out.returncode == 0, out.stderr
    names = {(c["name"], c["plugin"]) for c in json.loads(out.stdout)}
    assert {("tensorboard", "loggers"), ("mlflow", "loggers"), ("csv", "loggers")} <= names
