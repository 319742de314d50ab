"""Built-in loggers: `tensorboard`, `mlflow` and `csv` (``tk finetune --log NAME``).

They are also the reference example of an observer plugin. ``tk_register_loggers`` names
a factory per logger; tk calls it once per run that selects it, with the run's log folder
and name, and attaches the object it returns for that run: its methods marked with
``@hookimpl`` are observer hooks (``tk_train_start``, ``tk_epoch_end``, ``tk_model_saved``,
``tk_train_end``), called like any plugin's. An observer must never stop training: tk
reports a logger's first failure in one line and calls it no more for that run.

Registering imports nothing heavy; TensorBoard and MLflow are imported when a run asks for
them, and a missing one is one line naming the extra to install.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
from pathlib import Path
from typing import Any

from toolkit.errors import TkError
from toolkit.plugin.hookspecs import hookimpl

# training arguments that say where things go or how the run is shown, not what it learns
NOT_PARAMS = ("store", "quiet", "overwrite", "resume", "log", "log_dir", "classes", "name")


def _missing(logger: str, exc: ImportError) -> TkError:
    """The one line for a logger whose library is not installed (the extra has its name)."""
    return TkError(f"--log {logger} needs the {logger} package ({exc}): "
                   f"pip install 'tk-microtoolkit[{logger}]'")


def _folder(path: str | Path, logger: str) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TkError(f"--log {logger}: cannot create the log folder {folder} "
                      f"({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK):
        raise TkError(f"--log {logger}: cannot write to the log folder {folder}")
    return folder


def params(config: dict[str, Any]) -> dict[str, Any]:
    """The training arguments as flat ``{"lr": 0.001, "options.head.dropout": 0.2}``:
    numbers, strings and booleans; lists as JSON; ``None`` left out."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        elif value is not None:
            flat[prefix] = json.dumps(value, default=str)

    walk("", {k: v for k, v in config.items() if k not in NOT_PARAMS})
    return flat


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """An epoch's numbers (``epoch`` itself is the step, not a value)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- TensorBoard -----------------------------------------------------------------------------

def tensorboard_tag(key: str) -> str:
    """``train_loss`` -> ``train/loss``, ``val_acc`` -> ``val/acc``, ``lr`` -> ``opt/lr``,
    ``images_per_s`` -> ``speed/images_per_s``: TensorBoard groups tags by their prefix."""
    for prefix in ("train", "val"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return {"lr": "opt/lr", "images_per_s": "speed/images_per_s",
            "epoch_time": "speed/epoch_time"}.get(key, f"other/{key}")


class TensorBoardLogger:
    """Event files in ``log_dir`` (``tensorboard --logdir $TK_HOME/runs`` shows every
    run): per-epoch scalars, the hyperparameters (HParams dashboard, in the same run) and
    the config as text, the training curves and confusion matrix as images."""

    def __init__(self, log_dir: str, run_name: str):
        try:
            import tensorboard  # noqa: F401 - torch's SummaryWriter needs it
        except ImportError as exc:
            raise _missing("tensorboard", exc) from None
        from torch.utils.tensorboard import SummaryWriter

        self.run_name = run_name
        self.writer = SummaryWriter(str(_folder(log_dir, "tensorboard")))
        self.last_epoch = 0

    @hookimpl
    def tk_train_start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # the HParams summaries written into this run (SummaryWriter.add_hparams would
        # start another run in a sub-folder); the metrics are the scalars logged below
        metric_tags = {tensorboard_tag(k): 0.0 for k in ("val_acc", "val_loss", "train_loss")}
        for summary in hparams(params(config), metric_tags):
            self.writer._get_file_writer().add_summary(summary)
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", "```\n" + text + "\n```")
        self.writer.flush()

    @hookimpl
    def tk_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(tensorboard_tag(key), value, global_step=epoch)
        self.last_epoch = epoch
        self.writer.flush()

    @hookimpl
    def tk_model_saved(self, metadata: dict[str, Any], artifacts: dict[str, str]) -> None:
        import numpy as np
        from PIL import Image

        step = int(metadata.get("metrics", {}).get("best_epoch") or self.last_epoch)
        for kind, path in sorted(artifacts.items()):
            if str(path).endswith(".png"):
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"plots/{kind}", pixels, global_step=step,
                                      dataformats="HWC")
        self.writer.flush()

    @hookimpl
    def tk_train_end(self) -> None:
        self.writer.close()


# -- MLflow ----------------------------------------------------------------------------------

MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED",
                 "stopped": "KILLED"}


def mlflow_tracking_uri(log_root: str | None) -> str:
    """``$MLFLOW_TRACKING_URI``, else a local file store: ``--log-dir DIR`` or
    ``./mlruns``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return Path(log_root or "mlruns").absolute().as_uri()


class MLflowLogger:
    """One MLflow run per tk run, in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default
    ``tk``): the training arguments as params, every epoch's numbers as metrics (step =
    epoch), the plots and a self-contained copy of the saved model as artifacts, tags
    ``tk.model`` and ``tk.version``; the run's status follows the tk run's ending."""

    def __init__(self, log_dir: str, run_name: str, log_root: str | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", exc) from None

        from toolkit.version import __version__

        self.uri = mlflow_tracking_uri(log_root)
        # MLflow writes "View run ... at URL" to stdout, where tk's --json output goes
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        if self.uri.startswith("file:"):
            # MLflow 3 keeps the file store only on request; tk's default local store is one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        else:  # a server that does not answer: fail in seconds, not minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.run_name, self.version = run_name, __version__
        try:  # reach the store now: a wrong URI stops the run before training, not after
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(
                os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tk")
        except TkError:
            raise
        except Exception as exc:
            why = " ".join(str(exc).split())[:300]
            raise TkError(f"--log mlflow: cannot use the tracking store {self.uri} "
                          f"({type(exc).__name__}: {why})") from None
        self.run_id: str | None = None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:  # another process created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    @hookimpl
    def tk_train_start(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                     tags={"tk.model": self.run_name,
                                           "tk.version": self.version})
        self.run_id = run.info.run_id
        items = [Param(k[:250], str(v)[:6000]) for k, v in sorted(params(config).items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    @hookimpl
    def tk_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, v, now, epoch) for k, v in scalars(metrics).items()])

    @hookimpl
    def tk_model_saved(self, name: str, path: str, artifacts: dict[str, str]) -> None:
        import tempfile

        from model_store import ModelStore

        if self.run_id is None:
            return
        self.client.set_tag(self.run_id, "tk.model", name)
        for kind in sorted(artifacts):
            self.client.log_artifact(self.run_id, artifacts[kind], "plots")
        # the store keeps tensors shared between models (a frozen backbone) once, outside
        # the model's file: the artifact is a self-contained copy of the model
        store_root = Path(path).parent.parent  # STORE/models/NAME.safetensors
        stored = ModelStore(store_root).read(name)
        with tempfile.TemporaryDirectory(prefix="tk-mlflow-") as tmp:
            copy = ModelStore(tmp).save(name, stored.tensors, stored.meta)
            self.client.log_artifact(self.run_id, str(copy.path), "model")

    @hookimpl
    def tk_train_end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


# -- CSV -------------------------------------------------------------------------------------

class CSVLogger:
    """``log_dir/metrics.csv``: one row per epoch, a column per number. A resumed run
    appends; a new run under a name that has a file already moves that one aside
    (``metrics-YYYYmmdd-HHMMSS.csv``)."""

    def __init__(self, log_dir: str, run_name: str):
        self.path = _folder(log_dir, "csv") / "metrics.csv"
        self.fields: list[str] | None = None

    @hookimpl
    def tk_train_start(self, config: dict[str, Any]) -> None:
        if not config.get("resume") and self.path.exists() and self.path.stat().st_size:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            self.path.rename(self.path.with_name(f"metrics-{stamp}.csv"))

    @hookimpl
    def tk_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        row = {"epoch": epoch, **scalars(metrics)}
        if self.fields is None and self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="", encoding="utf-8") as fh:
                self.fields = next(csv.reader(fh), None)
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore",
                                    restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)


@hookimpl
def tk_register_loggers(register: Any) -> None:
    register("tensorboard", TensorBoardLogger,
             description="TensorBoard event files: scalars per epoch, hparams, plots "
                         "(extra [tensorboard])")
    register("mlflow", MLflowLogger,
             description="an MLflow run: params, metrics per epoch, plots and model as "
                         "artifacts (extra [mlflow]; MLFLOW_TRACKING_URI, else ./mlruns)")
    register("csv", CSVLogger, description="metrics.csv, one row per epoch")
