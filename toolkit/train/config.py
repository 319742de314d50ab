"""What a fine-tuning run is asked to do: :class:`FinetuneArgs`, its checks and bounds, and
where the values come from (a TOML ``--config`` file, the command line, ``--opt``).

The CLI collects click's values and calls :func:`finetune_args`; the Python API can do the
same with a config file::

    from toolkit.train.config import finetune_args
    from toolkit.train.finetune import finetune
    args = finetune_args({"epochs": 3}, config="run.toml")   # given values win over the file
    finetune(args, plugins)

Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
import stat
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from toolkit.errors import TkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPONENTS = ("backbone", "head", "loss", "optimizer", "dataset")
# a config file is a few hundred bytes; more is a mistake (or /dev/zero)
MAX_CONFIG_BYTES = 1 << 20
DEFAULT_LR = 1e-3  # when neither --lr nor the optimizer's registered default_lr says
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class FinetuneArgs:
    """Every option of ``tk finetune`` (``None``: the default, chosen and recorded at run
    time). Field names are the CLI's long options with ``_`` for ``-``."""

    backbone: str
    classes: int | None = None
    data: str | None = None
    val_data: str | None = None
    dataset: str | None = None
    head: str | None = None  # None: the default a plugin registers (built-in: linear)
    loss: str | None = None  # built-in default: cross-entropy
    optimizer: str | None = None  # built-in default: adamw
    epochs: int = 5
    batch_size: int = 32
    lr: float | str | None = None  # None: the optimizer's default_lr, else 1e-3; "auto"
    lr_auto: bool = False  # --lr auto: the LR range test picks it (set by check())
    lr_find_steps: int = 100  # steps of that test
    weight_decay: float = 0.05
    freeze: str = "none"
    unfreeze_at: int | None = None
    backbone_lr_scale: float | None = None  # default: 0.1 pretrained, 1.0 from scratch
    pretrained: bool = True
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed where the device computes bf16 natively
    channels_last: bool | None = None  # None: auto (on for convolutional backbones)
    compile: bool = False
    image_size: int | None = None
    val_split: float = 0.2
    workers: int | None = None  # None: toolkit.devices.train_workers()
    seed: int = 0
    patience: int | None = None
    warmup_epochs: float = 1.0
    augment: bool = True
    cache_features: bool | None = None  # None: automatic (frozen backbone, no augmentation)
    name: str | None = None
    store: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    # recipes (issue 18)
    multi_label: bool = False  # a plugin dataset's targets are multi-hot (csv: from header)
    threshold: float | None = None  # multi-label: one decision threshold for every class
    class_weights: str | None = None  # auto (inverse frequency) | effective (number)
    sampler: str | None = None  # balanced: WeightedRandomSampler over class frequencies
    accumulate: int = 1  # micro-batches per optimizer step
    ema: float | None = None  # decay of an exponential moving average of the weights
    mixup: float = 0.0  # MixUp alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    log: list[str] = field(default_factory=list)  # logger names (tk list loggers)
    log_dir: str | None = None  # None: each run logs into $TK_HOME/runs/NAME/logs
    options: dict[str, dict[str, Any]] = field(default_factory=lambda: {c: {} for c in COMPONENTS})

    def check(self) -> None:
        """Types and ranges of every field: one :class:`TkError` line naming the option.
        Called before torch is imported, so user errors come back at once."""
        if isinstance(self.lr, str) and self.lr.strip().lower() == "auto":
            self.lr, self.lr_auto = None, True
        hints = _field_types()
        for f in fields(self):
            if f.name != "options":
                setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name],
                                              f"--{f.name.replace('_', '-')}"))
        if not math.isfinite(self.val_split):
            raise TkError(f"--val-split must be a finite number, got {self.val_split}")
        for f_name, (low, high) in BOUNDS.items():
            _check_range(f"--{f_name.replace('_', '-')}", getattr(self, f_name), low, high)
        self.freeze = _freeze_value(self.freeze)
        if not 0 < self.val_split < 1:
            raise TkError(f"--val-split must be between 0 and 1, got {self.val_split}")
        if self.weights and not self.pretrained:
            raise TkError("--weights and --no-pretrained contradict each other")
        if self.name is not None and not NAME_RE.fullmatch(self.name):
            raise TkError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-'")
        self.options = check_options(self.options)
        self._check_recipes()

    def _check_recipes(self) -> None:
        for flag, value in (("--ema", self.ema), ("--threshold", self.threshold)):
            if value is not None and not 0 < value < 1:
                raise TkError(f"{flag} must be between 0 and 1 (exclusive), got {value:g}")
        if self.class_weights is not None:
            self.class_weights = self.class_weights.strip().lower()
            if self.class_weights not in CLASS_WEIGHTS:
                raise TkError(f"--class-weights {self.class_weights}: expected one of "
                              f"{', '.join(CLASS_WEIGHTS)}")
        if self.sampler is not None:
            self.sampler = self.sampler.strip().lower()
            if self.sampler not in SAMPLERS:
                raise TkError(f"--sampler {self.sampler}: expected one of {', '.join(SAMPLERS)}")
        if (self.mixup or self.cutmix) and self.cache_features:
            raise TkError("--mixup and --cutmix mix images: they do not work with "
                          "--cache-features")


CLASS_WEIGHTS = ("auto", "effective")  # inverse frequency; effective number of samples
SAMPLERS = ("balanced",)


# field -> (lowest, highest) allowed; None: unbounded on that side. Wide enough for any real
# run, small enough that a typo (epochs = 1e300) fails at once instead of training forever.
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "classes": (1, 1_000_000),
    "epochs": (1, 100_000),
    "batch_size": (1, 65_536),
    "lr": (0, 100.0),  # lower bound exclusive for these "positive" ones (see _check_range)
    "weight_decay": (0, 100.0),
    "unfreeze_at": (1, 100_000),
    "backbone_lr_scale": (0, 1000.0),
    "image_size": (1, 8192),
    "workers": (0, 1024),
    "seed": (0, 2**32 - 1),
    "patience": (1, 100_000),
    "warmup_epochs": (0, 100_000.0),
    "accumulate": (1, 65_536),
    "mixup": (0, 1000.0),
    "cutmix": (0, 1000.0),
    "lr_find_steps": (5, 100_000),
}
_POSITIVE = {"classes", "epochs", "batch_size", "lr", "unfreeze_at", "image_size", "patience",
             "accumulate"}


def _check_range(flag: str, value: Any, low: float | None, high: float | None) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise TkError(f"{flag} must be a finite number, got {value}")
    name = flag[2:].replace("-", "_")
    if name in _POSITIVE and not value > 0:
        raise TkError(f"{flag} must be positive, got {value}")
    if low is not None and value < low:
        raise TkError(f"{flag} must not be negative, got {value}" if low == 0
                      else f"{flag} must be at least {low}, got {value}")
    if high is not None and value > high:
        shown = f"{value:.6g}" if isinstance(value, (int, float)) else repr(value)
        raise TkError(f"{flag} must be at most {high:g}, got {shown}")


def _freeze_value(value: Any) -> str:
    v = str(value).strip().lower()
    if v in ("all", "none") or (v.isdigit() and len(v) <= 6):
        return v
    raise TkError(f"--freeze {value}: expected all, none or a number of layer groups")


# -- types --------------------------------------------------------------------------------

def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(FinetuneArgs)


def _coerce(name: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's type (``int | None``...), or one line naming ``where``.
    Integral floats become ints (TOML ``epochs = 5.0``); a bool is never a number."""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise TkError(f"{where}: a value is required")
    if typing.get_origin(hint) is list:  # --log: a list of names (one name is a list of one)
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) and v for v in items):
            return list(items)
        raise TkError(f"{where} = {value!r}: expected a name or a list of names")
    base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    kind = base[0]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TkError(f"{where} = {value!r}: expected true or false")
    if kind is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TkError(f"{where} = {value!r}: {value!r} is not a valid integer.")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TkError(f"{where} = {value!r}: {value!r} is not a valid number.")
    if kind is str:
        if name == "freeze" and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        raise TkError(f"{where} = {value!r}: expected a string")
    return value


def check_options(options: Any) -> dict[str, dict[str, Any]]:
    """Component options: ``{component: {key: TOML value}}`` with known components, string
    keys and finite numbers (``--opt head.dropout=nan`` is refused here)."""
    if not isinstance(options, dict):
        raise TkError(f"component options must be a table per component, got {options!r}")
    out: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
    for component, opts in options.items():
        if component not in COMPONENTS:
            raise TkError(f"unknown component '{component}' (one of: {', '.join(COMPONENTS)})")
        if not isinstance(opts, dict):
            raise TkError(f"options of {component}: expected a table of KEY = VALUE, "
                          f"got {opts!r}")
        for key, value in opts.items():
            _check_option_value(f"{component}.{key}", value)
        out[component] = dict(opts)
    return out


def _check_option_value(where: str, value: Any, depth: int = 0) -> None:
    if depth > 32:
        raise TkError(f"--opt {where}: nested more than 32 levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise TkError(f"--opt {where}={value}: must be a finite number")
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_option_value(where, v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            _check_option_value(where, v, depth + 1)


# -- --opt and --config --------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A TOML literal when it is one (``512``, ``0.1``, ``true``, ``[1, 2]``, ``"x"``),
    else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise TkError(f"--opt value {text[:40]!r}...: nested too deeply") from None


def parse_opts(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["head.hidden=512", "loss.gamma=1"]`` -> ``{"head": {"hidden": 512}, ...}``."""
    out: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
    for item in items:
        key, sep, value = item.partition("=")
        component, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise TkError(f"--opt {item!r}: expected COMPONENT.KEY=VALUE, e.g. head.hidden=512")
        if component not in COMPONENTS:
            raise TkError(f"--opt {item!r}: unknown component '{component}' "
                          f"(one of: {', '.join(COMPONENTS)})")
        out[component][name.strip()] = parse_value(value.strip())
    return out


def read_config_text(path: str | Path) -> str:
    """The text of a config file: a regular file (a FIFO or a device would hang or never
    end) of at most :data:`MAX_CONFIG_BYTES`, in UTF-8."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise TkError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise TkError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise TkError(f"--config {path}: is a directory, not a TOML file")
        if not stat.S_ISREG(st.st_mode):
            raise TkError(f"--config {path}: not a regular file (a pipe or a device); "
                          "give a TOML file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise TkError(f"--config {path}: {st.st_size} bytes; a config file may have at "
                          f"most {MAX_CONFIG_BYTES} bytes")
        try:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise TkError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise TkError(f"--config {path}: a config file may have at most {MAX_CONFIG_BYTES} "
                      "bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TkError(f"--config {path}: not UTF-8 text ({exc.reason} at byte "
                      f"{exc.start})") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config: top-level keys are finetune options (``epochs = 5``,
    ``batch_size = 32``, dashes or underscores), tables ``[backbone]``, ``[head]``,
    ``[loss]``, ``[optimizer]``, ``[dataset]`` hold component options (a ``name`` key in
    such a table picks the component). Returns ``{field: value, "options": {...}}``;
    values are not checked yet (:func:`finetune_args` does)."""
    text = read_config_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TkError(f"--config {path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise TkError(f"--config {path}: nested too deeply") from None
    out: dict[str, Any] = {"options": {c: {} for c in COMPONENTS}}
    for key, value in data.items():
        if key in COMPONENTS and isinstance(value, dict):
            value = dict(value)
            if "name" in value:
                out[key] = value.pop("name")
            out["options"][key] = value
        else:
            name = key.replace("-", "_")
            if name == "options" or name not in _settable():
                raise TkError(f"--config {path}: unknown option(s) {key}")
            out[name] = value
    return out


def _settable() -> set[str]:
    return {f.name for f in fields(FinetuneArgs)} - {"options", "lr_auto"}


def finetune_args(given: dict[str, Any] | None = None, *,
                  opts: list[str] | tuple[str, ...] = (),
                  config: str | Path | None = None) -> FinetuneArgs:
    """The :class:`FinetuneArgs` of a run: the ``config`` file's values, overridden by
    ``given`` (the command line's; ``None`` values count as not given), component options
    from the file, then ``opts`` (``["head.hidden=512"]``) on top. Checked (types, ranges)
    with one clear line per mistake."""
    values: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
    if config is not None:
        loaded = load_config(config)
        for c, o in loaded.pop("options").items():
            options[c].update(o)
        hints = _field_types()
        for key, value in loaded.items():
            values[key] = _coerce(key, value, hints[key], f"--config {config}: {key}")
    unknown = sorted(set(given or {}) - _settable())
    if unknown:
        raise TkError(f"unknown finetune option(s): {', '.join(unknown)}")
    values.update({k: v for k, v in (given or {}).items() if v is not None})
    for c, o in parse_opts(opts).items():
        options[c].update(o)
    if not values.get("backbone"):
        raise TkError("--backbone is required (see `tk list backbones`)")
    args = FinetuneArgs(**values, options=options)
    args.check()
    return args
