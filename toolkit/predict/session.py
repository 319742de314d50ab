"""Opening a model for prediction, whatever it is: a stored model (torch) or an exported
``.onnx`` file (ONNX Runtime, no torch). `tk infer` uses it, and so can `tk serve`.

```python
from toolkit.predict.session import open_predictor

with open_predictor("photos.onnx") as opened:          # or a stored name, or None (newest)
    runner = opened.runner(batch_size=32, topk=3)      # a toolkit.predict.runner.Runner
    for row in runner.predict_paths(["photos/"]):
        print(row.path, row.label, row.score)
    opened.runtime.start(crops)                         # or the Runtime directly (uint8 NHWC)
```

Which runtime (``runtime="auto"``, the default): a ``--model`` value that names a file (it
holds a ``/``, or ends in ``.onnx`` and no stored model has that name) is an exported file
and runs on ONNX Runtime; anything else is a stored model name and runs on torch.
``runtime="onnx"`` with a stored model name is refused in one line that says to run
``tk export`` and pass the file: exports are not kept in the store (an ONNX export takes
tens of seconds and needs torch, which the ONNX path exists to avoid; the file is the
deployable thing, its metadata says which stored model and weights it came from).
``runtime="torch"`` with an exported file is refused the same way.

:func:`resolve_model` is the cheap half (no torch, no onnxruntime, no plugins): which model,
which runtime, its class names and its file; :func:`open_predictor` then builds the
runtime. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError

if TYPE_CHECKING:
    from model_store import ModelStore
    from toolkit.data.listing import Warn
    from toolkit.data.transforms import EvalTransform
    from toolkit.model.loading import LoadedModel
    from toolkit.predict.export.artifact import ExportInfo
    from toolkit.predict.runner import Runner
    from toolkit.predict.runtime import Runtime

RUNTIMES = ("auto", "torch", "onnx")
EXPORT_SUFFIXES = (".onnx",)

Log = Callable[[str], None]
PluginsArg = Any  # toolkit.plugin.manager.Plugins, a zero-argument callable giving them, or None


def _quiet(_message: str) -> None:
    pass


@dataclass
class ModelRef:
    """Which model, resolved cheaply. ``kind``: ``"store"`` (a stored model, torch runtime)
    or ``"onnx"`` (an exported file, ONNX Runtime); ``name``: the stored name, or the file
    path as given; ``path``: the model file; ``classes``: its class names (index = logit
    column); ``export``: the checked metadata of an exported file."""

    kind: str
    name: str
    path: Path
    classes: list[str]
    export: ExportInfo | None = None

    @property
    def runtime(self) -> str:
        return "onnx" if self.kind == "onnx" else "torch"


def names_a_file(model: str, store: ModelStore | None = None) -> bool:
    """Whether a ``--model`` value names a file rather than a stored model: it holds a path
    separator, or it ends in ``.onnx`` and is a file or not a stored model's name."""
    if "/" in model or os.sep in model or (os.altsep and os.altsep in model):
        return True
    if not model.lower().endswith(EXPORT_SUFFIXES):
        return False
    if os.path.exists(model) or store is None:
        return True
    try:
        return not store.model_path(model).exists()
    except Exception:  # not a valid store name: then it is a file name
        return True


def resolve_model(model: str | os.PathLike[str] | None, *,
                  store: ModelStore | str | os.PathLike[str] | None = None,
                  runtime: str = "auto", log: Log = _quiet) -> ModelRef:
    """The model ``--model`` means (None: the newest stored model, said through ``log``)
    and the runtime it runs on; one-line :class:`~toolkit.errors.TkError` for a missing
    model, a file that is not a usable ONNX export, or a runtime that does not fit."""
    from model_store import ModelStore

    if runtime not in RUNTIMES:
        raise TkError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    st = store if isinstance(store, ModelStore) else ModelStore(store)
    text = os.fspath(model) if model is not None else None
    if text and (isinstance(model, os.PathLike) or names_a_file(text, st)):
        if runtime == "torch":
            raise TkError(f"--runtime torch runs a stored model; {text} is an exported file "
                          "(drop --runtime, or pass a stored model name)")
        from toolkit.predict.export.artifact import ExportFileError, read_export

        info = read_export(text)
        if info.format != "onnx":
            raise ExportFileError(f"{text}: a {info.format} export, which runs in PyTorch; "
                                  "`--model` takes an ONNX export (`tk export MODEL --format "
                                  "onnx`) or a stored model name")
        return ModelRef("onnx", text, Path(text), list(info.classes), info)
    name = text or newest_model(st, log)
    if runtime == "onnx":
        raise TkError(f"--runtime onnx runs an exported file; export the stored model first: "
                      f"`tk export {name} -o {name}.onnx`, then `--model {name}.onnx`")
    info = st.info(name)  # a missing model fails here, cheaply
    return ModelRef("store", name, Path(st.model_path(name)), list(info.classes))


def newest_model(store: ModelStore, log: Log = _quiet) -> str:
    """The name of the newest model in ``store`` (said through ``log``)."""
    newest = store.newest()
    if newest is None:
        raise TkError(f"no model in the store {store.root}; train one with `tk finetune` "
                      "or pass --store DIR")
    log(f"using model '{newest.name}' (the newest in {store.root}; --model NAME picks one)")
    return newest.name


@dataclass
class OpenedModel:
    """A model open for prediction (what :func:`open_predictor` yields).

    ``runtime``: a :class:`~toolkit.predict.runtime.Runtime` (``runtime.name`` is
    ``"torch"`` or ``"onnx"``); ``transform``: the model's
    :class:`~toolkit.data.transforms.EvalTransform` (its host half,
    :meth:`~toolkit.data.transforms.EvalTransform.crop`, makes the ``uint8 [H,W,3]`` crops
    the runtime takes); ``classes``: class names (index = logit column); ``meta``: the
    stored model's metadata, or for an export the same keys rebuilt from its file
    (``classes``, ``task``, ``data_config``, ``calibration`` when the model has a
    temperature, ``source``) plus ``export`` (``path``, ``format``, ``precision``,
    ``parity``, ``tk_version``, ``exported``); ``ref``: the :class:`ModelRef`;
    ``device``: where it runs (``cpu``, ``cuda:0``...); ``loaded``: the
    :class:`~toolkit.model.loading.LoadedModel` on the torch runtime, None on onnx."""

    ref: ModelRef
    runtime: Runtime
    transform: EvalTransform
    classes: list[str]
    meta: dict[str, Any]
    device: str = "cpu"
    loaded: LoadedModel | None = None

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def task(self) -> str:
        return str(self.meta.get("task") or "single-label")

    @property
    def temperature(self) -> float:
        """The calibration temperature its scores use (1.0: none)."""
        from toolkit.predict.scoring import model_temperature

        return model_temperature(self.meta)

    def runner(self, *, batch_size: int = 32, topk: int = 1, workers: int | None = None,
               decode: str = "auto", warn: Warn | None = None, calibrated: bool = True,
               min_score: float | None = None, keep_outputs: bool = False) -> Runner:
        """A :class:`~toolkit.predict.runner.Runner` over this model (files -> rows), scored
        as :mod:`toolkit.predict.scoring` says (its calibration unless ``calibrated`` is
        False, ``min_score``, a multi-label model's thresholds)."""
        from toolkit.data.listing import warn_stderr
        from toolkit.predict.runner import Runner
        from toolkit.predict.scoring import Scoring, thresholds_of

        return Runner(self.runtime, self.transform, self.classes, batch_size=batch_size,
                      topk=topk, workers=workers, decode=decode, warn=warn or warn_stderr,
                      scoring=Scoring.for_model(self.meta, calibrated=calibrated,
                                                min_score=min_score),
                      keep_outputs=keep_outputs,
                      thresholds=thresholds_of(self.meta, len(self.classes)))


@contextlib.contextmanager
def open_predictor(model: str | os.PathLike[str] | ModelRef | None = None, *,
                   store: ModelStore | str | os.PathLike[str] | None = None,
                   runtime: str = "auto", device: Any = "auto", precision: str = "32",
                   channels_last: bool | None = None, decode: str = "auto", tta: bool = False,
                   plugins: PluginsArg = None, threads: int | None = None,
                   log: Log = _quiet) -> Iterator[OpenedModel]:
    """Open ``model`` (a stored name, an exported ``.onnx`` path, a :class:`ModelRef` from
    :func:`resolve_model`, or None for the newest stored model) for prediction.

    torch (stored models): ``device`` (``auto``, ``cpu``, ``cuda:N``, ``mps`` or a
    ``torch.device``), ``precision``, ``channels_last``, ``decode="torchvision"`` (the
    runtime then accepts JPEG bytes), ``tta`` (mirror averaging), ``plugins`` (loaded
    plugins, a callable giving them, or None for the installed ones) apply; ``channels_last``
    None is auto (on for convolutional models on CPU/CUDA). onnx (exported files):
    ``device`` (``auto``, ``cpu``, ``cuda[:N]``) and ``threads`` (intra-op threads [the
    usable cores]) apply; ``precision`` other than ``32``/``auto``, ``channels_last=True``
    and ``tta`` are refused in one line (an export's precision is chosen by
    ``tk export [--int8]``). Never imports torch for an exported file."""
    ref = model if isinstance(model, ModelRef) else resolve_model(
        model, store=store, runtime=runtime, log=log)
    if ref.kind == "onnx":
        if tta:
            raise TkError("--tta runs on the torch runtime (a stored model), not on an "
                          "exported file")
        yield _open_onnx(ref, device=device, precision=precision,
                         channels_last=channels_last, threads=threads)
    else:
        yield _open_torch(ref, store=store, device=device, precision=precision,
                          channels_last=channels_last, decode=decode, tta=tta,
                          plugins=plugins)


def _open_onnx(ref: ModelRef, *, device: Any, precision: str, channels_last: bool | None,
               threads: int | None) -> OpenedModel:
    from toolkit.data.transforms import EvalTransform
    from toolkit.model.backbone import DataConfig
    from toolkit.predict.export.artifact import ExportFileError
    from toolkit.predict.onnx_runtime import OnnxRuntime

    if str(precision) not in ("32", "auto"):
        raise TkError(f"--precision {precision}: an exported model runs at the precision it "
                      "was exported with (`tk export --int8` makes an int8 file)")
    if channels_last:
        raise TkError("--channels-last applies to the torch runtime, not to an exported file")
    rt = OnnxRuntime.open(ref.path, device=str(device), threads=threads)
    info = rt.info
    transform = EvalTransform(DataConfig.from_dict(info.data_config))
    resize = info.preprocess["resize"]
    resize = resize if isinstance(resize, int) else tuple(resize)
    if transform.crop_size != info.crop_size or transform.resize_size != resize:
        raise ExportFileError(f"{ref.path}: damaged tk metadata (resize {resize} and crop "
                              f"{list(info.crop_size)} do not follow from input_size and "
                              "crop_pct); re-export the model")
    meta: dict[str, Any] = {
        "classes": list(info.classes), "task": info.task, "data_config": info.data_config,
        "source": dict(info.source),
        "export": {"path": str(ref.path), "format": info.format, "precision": info.precision,
                   "parity": dict(info.parity), "tk_version": info.tk_version,
                   "exported": info.exported},
    }
    if info.calibration:
        meta["calibration"] = dict(info.calibration)
    if info.task == "multi-label" and info.thresholds:
        meta["thresholds"] = list(info.thresholds)
    return OpenedModel(ref, rt, transform, list(info.classes), meta, device=rt.device)


def _open_torch(ref: ModelRef, *, store: Any, device: Any, precision: str,
                channels_last: bool | None, decode: str, tta: bool,
                plugins: PluginsArg) -> OpenedModel:
    from toolkit.data.transforms import eval_transform
    from toolkit.model.loading import load_model
    from toolkit.predict.scoring import thresholds_of
    from toolkit.predict.torch_runtime import TorchRuntime

    if callable(plugins) and not hasattr(plugins, "registry"):
        plugins = plugins()
    loaded = load_model(ref.name, store, plugins=plugins, device="cpu")
    transform = eval_transform(loaded.data_config)
    rt = TorchRuntime(loaded.model, transform, device=device, precision=precision,
                      channels_last=channels_last, jpeg=decode == "torchvision", tta=tta,
                      multi_label=thresholds_of(loaded.meta, len(loaded.classes)) is not None)
    loaded.model = rt.model
    return OpenedModel(ref, rt, transform, list(loaded.classes), dict(loaded.meta),
                       device=str(rt.device), loaded=loaded)
