"""`tk tune`: a hyperparameter search over `tk finetune` on Optuna.

Each trial is a real :func:`toolkit.train.finetune.finetune` run with the fixed options of
the command line (and ``--config``/``--opt``) plus the values the sampler draws from the
search space; the per-epoch metric goes to the trial and the pruner (median by default)
stops hopeless trials after any epoch. Diverged trials (a NaN loss) count as pruned.
Frozen-backbone trials share tk's feature cache like any run with the same backbone and
data (``--freeze all --no-augment``).

Studies live in an Optuna storage (by default ``sqlite:///$TK_HOME/tune/optuna.db``):
running ``tk tune`` again with the same ``--study`` continues it, and several processes
on one storage run trials in parallel (each draws its own; Optuna numbers them). Trial
models are stored as ``NAME-trialN``; after every trial the best finished trial's model
is copied to ``NAME`` (so an interrupted study still leaves its best model) and the
others are removed unless ``--keep-trials``. At the end: the optimisation-history and
parameter-importance plots as PNGs, and a table of the trials.

A search space is a TOML file, one entry per searched option::

    lr = {low = 1e-5, high = 0.1, log = true}     # float, log-uniform
    weight_decay = {low = 0.0, high = 0.1}       # float, uniform
    epochs = {low = 2, high = 6}                 # int (the option is an int)
    freeze = ["none", "all", 2]                  # choices (also: {choices = [...]})
    [head]
    dropout = {low = 0.0, high = 0.5}            # component option head.dropout
    [loss]
    label_smoothing = {low = 0.0, high = 0.2, step = 0.05}

Keys of an entry: ``low``, ``high``, ``log``, ``step``, ``type`` (``"int"`` or
``"float"``, for component options), or ``choices``. Everything is checked (names, ranges,
every bound against the finetune option's own limits, component option names against the
components) before any training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from toolkit.errors import TkError
from toolkit.train.config import (
    COMPONENTS,
    FinetuneArgs,
    finetune_args,
    load_config,
    parse_opts,
    read_config_text,
    tomllib,
)

METRICS = {"val_acc": "maximize", "val_loss": "minimize"}
PRUNERS = ("median", "hyperband", "none")
SPEC_KEYS = ("low", "high", "log", "step", "type", "choices")
# finetune options that say where data and results are, not how the model learns
NOT_SEARCHABLE = ("data", "val_data", "dataset", "classes", "name", "store", "resume",
                  "overwrite", "quiet", "log", "log_dir", "device", "workers", "weights",
                  "cache_features")
# the default search space (entries whose option the user fixed, or whose component does
# not take that option, are left out)
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-5, "high": 1e-1, "log": True},
    "weight_decay": {"low": 1e-6, "high": 0.1, "log": True},
    "freeze": {"choices": ["none", "all"]},
    "backbone_lr_scale": {"low": 0.01, "high": 1.0, "log": True},
    "head": {"dropout": {"low": 0.0, "high": 0.5}},
    "loss": {"label_smoothing": {"low": 0.0, "high": 0.2}},
}
MEDIAN_STARTUP_TRIALS = 3  # the median pruner waits for this many finished trials
CONSECUTIVE_FAILURES = 3  # a process stops after this many failed trials in a row
HEARTBEAT_S, GRACE_S = 60, 180  # a killed process's running trial is failed after GRACE_S


# -- arguments ----------------------------------------------------------------------------

@dataclass
class TuneArgs:
    """What ``tk tune`` is asked to do. ``given`` are finetune options as the command line
    gives them (``None``: not given), ``opts`` the ``--opt`` items, ``config`` the
    ``--config`` file; ``name`` (the best model's name), ``store`` and ``overwrite`` are
    read from ``given``."""

    given: dict[str, Any] = field(default_factory=dict)
    opts: tuple[str, ...] = ()
    config: str | None = None
    space: str | None = None  # TOML file; None: DEFAULT_SPACE
    trials: int = 20  # trials this process runs
    timeout: float | None = None  # seconds after which this process starts no new trial
    metric: str = "val_acc"
    study: str | None = None  # default: the model name
    storage: str | None = None  # default: sqlite:///$TK_HOME/tune/optuna.db
    pruner: str = "median"
    keep_trials: bool = False
    sampler_seed: int | None = None


@dataclass
class Param:
    """One searched option: ``lr`` or a component option ``head.dropout``."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @property
    def component(self) -> str | None:
        return self.name.split(".", 1)[0] if "." in self.name else None

    def corners(self) -> list[Any]:
        """The values that bound what can be drawn (checked before any training)."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),  # type: ignore[arg-type]
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high),  # type: ignore[arg-type]
                                   step=self.step, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {' | '.join(map(str, self.choices))}"
        extra = ", log" if self.log else (f", step {self.step:g}" if self.step else "")
        return f"{self.name} {self.low:g}..{self.high:g} ({self.kind}{extra})"


@dataclass
class TuneResult:
    study: str
    storage: str  # the URL, password hidden
    metric: str
    direction: str
    name: str  # the best model's name in the store
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    saved: bool  # the best model is in this store under ``name``
    trials: list[dict[str, Any]]
    plots: dict[str, str]
    interrupted: bool = False
    stopped: str | None = None  # why this process stopped early, if it did

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the search space -----------------------------------------------------------------------

def _field_kinds() -> dict[str, type]:
    import typing

    hints = typing.get_type_hints(FinetuneArgs)
    out = {}
    for f in fields(FinetuneArgs):
        if f.name == "options" or f.name in NOT_SEARCHABLE:
            continue
        hint = hints[f.name]
        base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        out[f.name] = base[0]
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_param(name: str, spec: Any, kind_hint: type | None, where: str) -> Param:
    """One entry of a space: ``spec`` is a list (choices) or a table of SPEC_KEYS."""
    at = f"{where}: {name}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise TkError(f"{at} = {spec!r}: expected a table (low, high, log, step) or a list "
                      "of choices")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise TkError(f"{at}: unknown key(s) {', '.join(unknown)} (an entry takes "
                      f"{', '.join(SPEC_KEYS)})")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise TkError(f"{at}: 'choices' cannot go with {', '.join(extra)}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise TkError(f"{at}: choices must be a non-empty list")
        if not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise TkError(f"{at}: choices must be strings, numbers or booleans")
        if len({(type(c), c) for c in choices}) != len(choices):
            raise TkError(f"{at}: a choice is listed twice")
        return Param(name, "categorical", choices=tuple(choices))
    if kind_hint in (str, bool):
        raise TkError(f"{at}: give a list of choices (the option takes "
                      f"{'true/false' if kind_hint is bool else 'a name'}, not a range)")
    if "low" not in spec or "high" not in spec:
        raise TkError(f"{at}: needs low and high (or a list of choices)")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for key, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None
                                                         else ()):
        if not _number(value) or not math.isfinite(value):
            raise TkError(f"{at}: {key} = {value!r} is not a finite number")
    if not isinstance(log, bool):
        raise TkError(f"{at}: log = {log!r}: expected true or false")
    if not low < high:
        raise TkError(f"{at}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise TkError(f"{at}: a log range needs low > 0 (got {low:g})")
    if log and step is not None:
        raise TkError(f"{at}: log and step cannot go together")
    if step is not None and (step <= 0 or step > high - low):
        raise TkError(f"{at}: step = {step:g} must be positive and at most high - low")
    forced = spec.get("type")
    if forced not in (None, "int", "float"):
        raise TkError(f"{at}: type = {forced!r}: expected \"int\" or \"float\"")
    if kind_hint is int or forced == "int" or (
            kind_hint is None and forced is None and all(
                isinstance(v, int) for v in (low, high) + ((step,) if step is not None
                                                          else ()))):
        if kind_hint is float and forced == "int":
            raise TkError(f"{at}: the option is a number, not an integer: drop type = \"int\"")
        for key, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and not float(value).is_integer():
                raise TkError(f"{at}: {key} = {value!r}: the option takes an integer")
        return Param(name, "int", int(low), int(high), log, int(step) if step else None)
    return Param(name, "float", float(low), float(high), log,
                 float(step) if step is not None else None)


def parse_space(data: dict[str, Any], where: str) -> list[Param]:
    """A space's TOML data -> its parameters (names checked, ranges well formed)."""
    kinds = _field_kinds()
    out: list[Param] = []
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in COMPONENTS and isinstance(value, dict) and (
                not set(value) <= set(SPEC_KEYS)):
            own = {k: v for k, v in value.items() if k in SPEC_KEYS}
            if own:  # the component itself is searched too: [head] choices = [...]
                out.append(parse_param(name, own, str, where))
            for option, spec in value.items():
                if option not in SPEC_KEYS:
                    out.append(parse_param(f"{name}.{option}", spec, None, where))
            continue
        if name not in kinds:
            searchable = sorted(kinds)
            if name in NOT_SEARCHABLE or name == "options":
                raise TkError(f"{where}: '{key}' cannot be searched (it says where data or "
                              "results go, not how the model learns)")
            close = difflib.get_close_matches(name, searchable, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TkError(f"{where}: unknown parameter '{key}'{hint} (searchable: "
                          f"{', '.join(searchable)}; component options as "
                          "[head] dropout = {...})")
        out.append(parse_param(name, value, kinds[name], where))
    if not out:
        raise TkError(f"{where}: the space is empty: add at least one parameter")
    return out


def read_space(path: str) -> dict[str, Any]:
    try:  # a regular UTF-8 file of at most 1 MiB, like --config
        text = read_config_text(path)
    except TkError as exc:
        raise TkError(str(exc).replace("--config", "--space", 1)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TkError(f"--space {path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise TkError(f"--space {path}: nested too deeply") from None


def fixed_names(args: TuneArgs) -> tuple[set[str], set[str]]:
    """Options the user fixed: (on the command line, in the --config file); component
    options as ``head.dropout``."""
    cli = {k for k, v in args.given.items() if v is not None}
    cli |= {f"{c}.{k}" for c, o in parse_opts(list(args.opts)).items() for k in o}
    from_file: set[str] = set()
    if args.config is not None:
        loaded = load_config(args.config)
        from_file = {f"{c}.{k}" for c, o in loaded.pop("options").items() for k in o}
        from_file |= set(loaded)
    return cli, from_file


# -- one trial's arguments -------------------------------------------------------------------

def trial_args(args: TuneArgs, values: dict[str, Any], name: str) -> FinetuneArgs:
    """The finetune arguments of one trial: the fixed options, then the drawn ``values``
    (over the config file's), the trial's model name."""
    given = {k: v for k, v in args.given.items() if v is not None}
    options: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if "." in key:
            role, option = key.split(".", 1)
            options.setdefault(role, {})[option] = value
        else:
            given[key] = str(value) if key == "freeze" else value
    given.update(name=name, overwrite=True, resume=False)
    out = finetune_args(given, opts=args.opts, config=args.config)
    for role, opts in options.items():
        out.options[role].update(opts)
    out.check()
    return out


# -- the storage -----------------------------------------------------------------------------

def shown_url(url: str) -> str:
    """The storage URL with its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy knows: show it as given
        return url


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (blocking; released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_storage(url: str) -> Any:
    """An Optuna RDB storage for ``url`` (tables created on first use; SQLite waits up to a
    minute for another process's write), or one TkError line."""
    import optuna

    db = _sqlite_file(url)
    if db is not None and not db.parent.is_dir():
        raise TkError(f"--storage {url}: the folder {db.parent} does not exist")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
    except Exception as exc:  # a bad URL, a missing driver, a server that does not answer
        why = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise TkError(f"--storage {shown_url(url)}: cannot open it ({type(exc).__name__}: "
                      f"{why})") from None


# -- the search ------------------------------------------------------------------------------

class Search:
    """One ``tk tune`` process: checks, the study, the trials, the best model, the plots."""

    def __init__(self, args: TuneArgs, plugins: Any, log: Callable[[str], None]):
        self.args, self.plugins, self.log = args, plugins, log
        self.failures_in_a_row = 0
        self.last_error = ""
        self.stopped: str | None = None

    # -- checks before anything is trained ---------------------------------------------
    def check(self) -> None:
        from model_store import ModelStore, check_name
        from toolkit.train.components import resolve_components

        a = self.args
        if a.metric not in METRICS:
            close = difflib.get_close_matches(a.metric, list(METRICS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TkError(f"--metric {a.metric}: unknown metric{hint} (one of: "
                          f"{', '.join(METRICS)})")
        if a.pruner not in PRUNERS:
            raise TkError(f"--pruner {a.pruner}: one of {', '.join(PRUNERS)}")
        if isinstance(a.trials, bool) or not isinstance(a.trials, int) or not (
                1 <= a.trials <= 1_000_000):
            raise TkError(f"--trials must be between 1 and 1000000, got {a.trials}")
        if a.timeout is not None and not (math.isfinite(a.timeout) and a.timeout > 0):
            raise TkError(f"--timeout must be a positive number of seconds, got {a.timeout}")
        if a.given.get("resume"):
            raise TkError("tk tune has no --resume: run it again with the same --study to "
                          "continue the study")
        self.base = finetune_args(a.given, opts=a.opts, config=a.config)
        components = resolve_components(self.base, self.plugins)
        self.store = ModelStore(self.base.store)
        bare = re.sub(r"[^A-Za-z0-9._-]", "-", components.backbone.name.split(":")[-1])
        self.name = self.base.name or a.study or f"{bare}-{components.dataset.name}-tune"
        check_name(self.name)
        self.study_name = a.study or self.name
        self.space = self._space(components)
        self._check_space()
        self.storage_url = a.storage or (
            "sqlite:///" + str(self.store.root.absolute() / "tune" / "optuna.db"))
        self.direction = METRICS[a.metric]

    def _space(self, components: Any) -> list[Param]:
        a = self.args
        cli, from_file = fixed_names(a)
        if a.space is None:
            params = parse_space(DEFAULT_SPACE, "the default space")
            kept = []
            for p in params:
                if p.name in cli or p.name in from_file:
                    continue  # the user fixed it
                if p.component:
                    accepted = getattr(components, p.component).accepted_options(
                        {"backbone": 1, "head": 2, "optimizer": 3}.get(p.component, 0))
                    if accepted is not None and p.name.split(".", 1)[1] not in accepted:
                        continue  # this component has no such option
                kept.append(p)
            if not kept:
                raise TkError("every parameter of the default space is fixed by your options; "
                              "give a --space FILE")
            return kept
        params = parse_space(read_space(a.space), f"--space {a.space}")
        both = sorted(p.name for p in params if p.name in cli)
        if both:
            flag = both[0] if "." in both[0] else f"--{both[0].replace('_', '-')}"
            raise TkError(f"--space {a.space}: {both[0]} is searched and also given on the "
                          f"command line ({flag}): drop one")
        return params

    def _check_space(self) -> None:
        """Every bound and choice of every parameter, with the others at their first
        value, must make valid finetune arguments with known component options."""
        from toolkit.train.components import resolve_components

        first = {p.name: p.corners()[0] for p in self.space}
        where = f"--space {self.args.space}" if self.args.space else "the default space"
        for p in self.space:
            for value in p.corners():
                values = dict(first, **{p.name: value})
                try:
                    args = trial_args(self.args, values, f"{self.name}-trial0")
                    resolve_components(args, self.plugins)
                except TkError as exc:
                    raise TkError(f"{where}: {p.name} = {value!r}: {exc}") from None

    # -- the study ---------------------------------------------------------------------
    def open(self) -> Any:
        import optuna

        # tk says what happens to each trial (optuna would add a traceback per failure)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        a = self.args
        db = _sqlite_file(self.storage_url)
        if a.storage is None:
            assert db is not None
            db.parent.mkdir(parents=True, exist_ok=True)
        # two processes creating one SQLite file's tables at once would collide
        with file_lock(db.with_name(db.name + ".lock")) if db else contextlib.nullcontext():
            storage = open_storage(self.storage_url)
            if self.study_name not in optuna.get_all_study_names(storage):
                self._check_name_is_free()
            try:
                study = optuna.create_study(
                    storage=storage, study_name=self.study_name, direction=self.direction,
                    pruner=self._pruner(), sampler=None, load_if_exists=True)
            except Exception as exc:
                raise TkError(f"--storage {shown_url(self.storage_url)}: cannot create study "
                              f"'{self.study_name}' ({type(exc).__name__}: {exc})") from None
        self._check_study(study)
        study.sampler = self._sampler(len(study.trials))
        return study

    def _check_name_is_free(self) -> None:
        """A new study must not replace a model it did not make (unless --overwrite)."""
        path = self.store.model_path(self.name)
        if path.is_file() and not self.base.overwrite:
            raise TkError(f"model '{self.name}' already exists in {self.store.root}; choose "
                          "another --name or pass --overwrite")

    def _identity(self) -> dict[str, Any]:
        b = self.base
        return {"name": self.name, "metric": self.args.metric, "backbone": b.backbone,
                "data": str(Path(b.data).absolute()) if b.data else None,
                "dataset": b.dataset, "classes": b.classes}

    def _check_study(self, study: Any) -> None:
        mine = self._identity()
        theirs = study.user_attrs.get("tk")
        if theirs is None:
            study.set_user_attr("tk", mine)
            return
        if self.args.given.get("name") is None:  # continuing: the study's model name
            self.name = theirs.get("name", self.name)
            mine["name"] = self.name
        for key, flag in (("metric", "--metric"), ("name", "--name"),
                          ("backbone", "--backbone"), ("data", "--data"),
                          ("dataset", "--dataset"), ("classes", "--classes")):
            if theirs.get(key) != mine[key]:
                raise TkError(f"study '{self.study_name}' was run with {flag} "
                              f"{theirs.get(key)}, not {mine[key]}; use the same, or "
                              "another --study")

    def _pruner(self) -> Any:
        import optuna

        if self.args.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
        if self.args.pruner == "none":
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS,
                                           n_warmup_steps=0)

    def _sampler(self, existing: int) -> Any:
        import optuna

        seed = self.args.sampler_seed
        # a continued study must not draw its first run's values again
        return optuna.samplers.TPESampler(seed=None if seed is None else seed + existing)

    # -- trials ------------------------------------------------------------------------
    def objective(self, trial: Any) -> float:
        import optuna

        from toolkit.train.finetune import finetune
        from toolkit.train.loop import NonFiniteLossError

        values = {p.name: p.suggest(trial) for p in self.space}
        model = f"{self.name}-trial{trial.number}"
        trial.set_user_attr("model", model)
        self.log(f"trial {trial.number}: {format_params(values)}")
        args = trial_args(self.args, values, model)
        metric = self.args.metric

        def report(epoch: int, metrics: dict[str, Any]) -> None:
            value = float(metrics[metric])
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4g} after epoch {epoch}")

        try:
            result = finetune(args, self.plugins, on_epoch_end=report, checkpoints=False)
        except NonFiniteLossError as exc:
            self.log(f"trial {trial.number} diverged: {exc}")
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        except TkError as exc:  # this trial's values do not work: the next ones may
            self.last_error = " ".join(str(exc).split())[:300]
            raise
        assert result is not None
        return float(result.metrics[metric])

    def after_trial(self, study: Any, trial: Any) -> None:
        import optuna

        state = trial.state
        if state == optuna.trial.TrialState.COMPLETE:
            self.failures_in_a_row = 0
            self.log(f"trial {trial.number} finished: {self.args.metric} {trial.value:.4g}")
        elif state == optuna.trial.TrialState.PRUNED:
            self.failures_in_a_row = 0
            steps = len(trial.intermediate_values)
            self.log(f"trial {trial.number} pruned after {steps} epoch(s)")
        elif state == optuna.trial.TrialState.FAIL:
            self.failures_in_a_row += 1
            why, self.last_error = self.last_error, ""
            self.log(f"trial {trial.number} failed{': ' + why if why else ''}")
            if self.failures_in_a_row >= CONSECUTIVE_FAILURES:
                self.stopped = (f"{CONSECUTIVE_FAILURES} trials in a row failed (the last: "
                                f"{why or 'see above'})")
                study.stop()
        self.sync_best(study)

    # -- the best model ----------------------------------------------------------------
    def _lock(self) -> Any:
        import hashlib

        key = hashlib.sha256(f"{self.storage_url}\0{self.study_name}".encode()).hexdigest()
        return file_lock(self.store.root / "tune" / f".{key[:24]}.lock")

    def sync_best(self, study: Any) -> Any:
        """Under the study's lock in this store: copy the best finished trial's model to
        ``name`` (when it changed) and remove the other trials' models (unless
        --keep-trials). Returns the best trial, or None."""
        import optuna

        with self._lock():
            finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
            complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
            best = None
            if complete:
                sign = 1 if self.direction == "maximize" else -1  # ties: the earlier trial
                best = max(complete, key=lambda t: (sign * t.value, -t.number))
            if best is not None:
                self._publish(best)
            if not self.args.keep_trials:
                for t in finished:
                    model = t.user_attrs.get("model")
                    if model and self.store.model_path(model).is_file():
                        self.store.remove(model)
        return best

    def _published_trial(self) -> tuple[str, int] | None:
        from toolkit.errors import StoreError

        try:
            tune = self.store.show(self.name).get("tune") or {}
        except (StoreError, OSError):
            return None
        return tune.get("study"), tune.get("trial")

    def _publish(self, best: Any) -> None:
        """Copy trial ``best``'s model to ``name`` (its frozen tensors stay shared)."""
        import shutil

        from model_store.sharing import references

        if self._published_trial() == (self.study_name, best.number):
            return
        model = best.user_attrs.get("model")
        if not model or not self.store.model_path(model).is_file():
            return  # removed meanwhile, or trained on another machine (its own store)
        stored = self.store.read(model)
        meta = dict(stored.meta)
        meta["tune"] = {"study": self.study_name, "trial": best.number,
                        "metric": self.args.metric, "value": best.value,
                        "params": dict(best.params), "model": model}
        shared = sorted({k for _, mapping in references(stored.meta) for k in mapping
                         if k != "*"} | {m["*"] for _, m in references(stored.meta)
                                         if "*" in m})
        self.store.save(self.name, stored.tensors, meta, shared=shared or None,
                        overwrite=True)
        for kind in ("curves.png", "confusion.png"):
            src = self.store.artifact_path(model, kind)
            if src.is_file():
                dst = self.store.artifact_path(self.name, kind)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        self.log(f"best so far: trial {best.number} ({self.args.metric} {best.value:.4g}), "
                 f"saved as model '{self.name}'")

    # -- plots ---------------------------------------------------------------------------
    def plots(self, study: Any) -> dict[str, str]:
        """Optuna's optimisation history and parameter importances as PNGs beside the best
        model's other plots (``artifacts/NAME/``). A plot that cannot be drawn (too few
        finished trials) is a note, not an error."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm

        out: dict[str, str] = {}
        for kind, draw in (("history", ovm.plot_optimization_history),
                           ("importance", ovm.plot_param_importances)):
            path = self.store.artifact_path(self.name, f"tune-{kind}.png")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = draw(study, target_name=self.args.metric)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(path, dpi=100)
                plt.close(fig)
                out[kind] = str(path)
            except Exception as exc:  # noqa: BLE001 - a plot never loses the study
                self.log(f"note: no {kind} plot ({' '.join(str(exc).split())[:200]})")
                plt.close("all")
        return out

    # -- the whole run -------------------------------------------------------------------
    def prepare(self) -> Any:
        """Every check, then the study (created or continued): nothing is trained yet."""
        self.check()
        return self.open()

    def run(self) -> TuneResult:
        import optuna

        study = self.prepare()
        self.log(f"study '{self.study_name}' in {shown_url(self.storage_url)}: "
                 f"{len(study.trials)} trial(s) so far; {self.args.trials} more, "
                 f"{self.direction} {self.args.metric}, pruner {self.args.pruner}; space: "
                 + "; ".join(p.describe() for p in self.space))
        interrupted = False
        try:
            study.optimize(self.objective, n_trials=self.args.trials,
                           timeout=self.args.timeout, catch=(TkError,),
                           callbacks=[self.after_trial], gc_after_trial=False)
        except KeyboardInterrupt:
            interrupted = True
            self.log("interrupted: the finished trials are kept in the study")
        best = self.sync_best(study)
        plots = self.plots(study) if any(
            t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else {}
        saved = best is not None and self._published_trial() == (self.study_name, best.number)
        if best is None:
            self.log("no trial finished: no model saved")
        elif not saved:
            self.log(f"the best trial ({best.number}) ran in another store; its model is "
                     "there")
        return TuneResult(
            study=self.study_name, storage=shown_url(self.storage_url), metric=self.args.metric,
            direction=self.direction, name=self.name,
            best_trial=None if best is None else best.number,
            best_value=None if best is None else best.value,
            best_params={} if best is None else dict(best.params), saved=saved,
            trials=[_trial_row(t) for t in study.trials], plots=plots,
            interrupted=interrupted, stopped=self.stopped)


def tune(args: TuneArgs, plugins: Any, log: Callable[[str], None] | None = None
         ) -> TuneResult:
    """Run (or continue) a study; see the module docstring. User errors are one TkError
    line each, before any training; Ctrl-C ends the study cleanly
    (``result.interrupted``)."""
    def stderr(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    return Search(args, plugins, log or stderr).run()


def _trial_row(t: Any) -> dict[str, Any]:
    duration = (t.datetime_complete - t.datetime_start).total_seconds() if (
        t.datetime_complete and t.datetime_start) else None
    return {"number": t.number, "state": t.state.name.lower(), "value": t.value,
            "epochs": len(t.intermediate_values), "seconds": duration,
            "params": dict(t.params)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_params(values: dict[str, Any]) -> str:
    """``lr=0.001234, freeze=all``."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())


def format_trials(result: TuneResult) -> str:
    """The trials as a plain-text table (best marked with ``*``)."""
    names = sorted({k for t in result.trials for k in t["params"]})
    head = ["trial", "state", result.metric, "epochs", "seconds", *names]
    rows = []
    for t in result.trials:
        mark = "*" if t["number"] == result.best_trial else ""
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        seconds = "" if t["seconds"] is None else f"{t['seconds']:.1f}"
        rows.append([f"{t['number']}{mark}", t["state"], value, str(t["epochs"]), seconds,
                     *[_fmt(t["params"][n]) if n in t["params"] else "" for n in names]])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    return "\n".join(lines)

