"""Step 1 of a run: which backbone, head, loss, optimizer and dataset it uses, with their
options checked and the defaults resolved, all through the registries (the core names no
concrete component: defaults are what plugins register with ``default=True``, and which
dataset reads ``--data PATH`` is asked of the plugins). Nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import DataError
from toolkit.train.config import DEFAULT_LR, FinetuneArgs

KINDS = {"backbone": "backbones", "head": "heads", "loss": "losses",
         "optimizer": "optimizers", "dataset": "datasets"}


@dataclass
class Components:
    """The resolved registry entries (``toolkit.plugin.registry.Component``) and the
    options each factory gets from the user (the dataset's with resolved paths)."""

    backbone: Any
    head: Any
    loss: Any
    optimizer: Any
    dataset: Any
    dataset_options: dict[str, Any]

    def items(self) -> list[tuple[str, Any]]:
        return [(role, getattr(self, role)) for role in KINDS]

    def record(self, plugins: Any) -> dict[str, dict[str, Any]]:
        """For the saved model's metadata (``components``): per role the qualified name and
        where it came from (plugin, module, distribution, version)."""
        return {role: {"name": c.qualified_name, **plugins.provenance(c.owner)}
                for role, c in self.items()}


def resolve_components(args: FinetuneArgs, plugins: Any) -> Components:
    """Resolve every component and check its option names (unknown names fail before any
    work)."""
    def pick(role: str, name: str | None) -> Any:
        registry = plugins.registry(KINDS[role])
        return registry.resolve(name) if name else registry.default()

    dataset, dataset_options = _dataset_choice(args, plugins)
    found = Components(backbone=pick("backbone", args.backbone), head=pick("head", args.head),
                       loss=pick("loss", args.loss),
                       optimizer=pick("optimizer", args.optimizer), dataset=dataset,
                       dataset_options=dataset_options)
    found.backbone.check_options(args.options["backbone"], positional=1)
    found.head.check_options(args.options["head"], positional=2)
    found.loss.check_options(args.options["loss"])
    found.optimizer.check_options(args.options["optimizer"], positional=3)
    return found


def _dataset_choice(args: FinetuneArgs, plugins: Any) -> tuple[Any, dict[str, Any]]:
    """Which dataset and its options: ``--dataset NAME`` (given ``--data PATH`` as its
    ``path``), else the dataset a plugin claims for ``--data PATH``
    (``tk_dataset_for_path``), else the default dataset a plugin registers (the embedded
    shapes). Path options are made absolute (a resume from another folder finds the same
    data, and the metadata says where it was)."""
    registry = plugins.registry("datasets")
    opts = resolve_paths(dict(args.options.get("dataset", {})))
    if args.data:
        path = Path(args.data)
        if not path.exists():
            raise DataError(f"--data {args.data}: no such file or directory")
        opts.setdefault("path", str(path.resolve()))
        if args.dataset:
            component = registry.resolve(args.dataset)
        else:
            name = plugins.dataset_for_path(str(path))
            if name is None:
                kind = "folder" if path.is_dir() else f"'{path.suffix or path.name}' file"
                raise DataError(
                    f"--data {args.data}: no loaded plugin reads a {kind} (the built-in "
                    "datasets plugin reads folders and .csv files; is it disabled by "
                    "TK_DISABLE_PLUGINS or TK_LOAD_PLUGINS?); name a dataset with --dataset")
            component = registry.resolve(name)
    else:
        component = registry.resolve(args.dataset) if args.dataset else registry.default()
    if args.val_data:
        opts.setdefault("val_path", str(Path(args.val_data).resolve()))
    return component, opts


def is_path_option(key: str) -> bool:
    """Dataset options that name files or folders: ``path``, ``root``, ``*_path``,
    ``*_dir``."""
    return key in ("path", "root") or key.endswith(("_path", "_dir"))


def resolve_paths(options: dict[str, Any]) -> dict[str, Any]:
    """Relative path options made absolute against the current folder."""
    return {k: (str(Path(v).resolve()) if is_path_option(k) and isinstance(v, str) and v
                else v) for k, v in options.items()}


def with_accepted(component: Any, positional: int, candidates: dict[str, Any],
                  options: dict[str, Any]) -> dict[str, Any]:
    """Add the core's common options (``num_classes``, ``seed``...) that the factory
    accepts and the user did not set."""
    accepted = component.accepted_options(positional)
    out = dict(options)
    for key, value in candidates.items():
        if value is not None and key not in out and (accepted is None or key in accepted):
            out[key] = value
    return out


def choose_lr(args: FinetuneArgs, optimizer: Any) -> tuple[float, str]:
    """``--lr``, else the optimizer's registered ``default_lr``, else 1e-3; and where the
    value came from (recorded in the metadata)."""
    if args.lr is not None:
        return args.lr, "--lr"
    registered = optimizer.default_lr  # checked by the registry when it was registered
    if registered is None:
        return DEFAULT_LR, "tk default"
    return registered, f"default_lr of {optimizer.qualified_name}"


def loss_for_task(args: FinetuneArgs, components: Components, task: str, plugins: Any
                  ) -> None:
    """The loss fits the task the data has: without ``--loss``, the default a plugin
    registers for that task (built-in: ``bce`` for multi-label); a loss named for the other
    task is refused with one line, and so is ``--class-weights`` with a loss that takes no
    weights (``class_weights``, or ``pos_weight`` for multi-label)."""
    from toolkit.errors import TkError

    loss = components.loss
    if args.loss is None and loss.task != task:
        loss = plugins.registry("losses").default(task)
        loss.check_options(args.options["loss"])
        components.loss = loss
    if loss.task != task:
        hint = ("a multi-label loss (tk list losses: bce, asl)" if task == "multi-label"
                else "a single-label loss (e.g. cross-entropy, focal)")
        raise TkError(f"--loss {loss.name} is a {loss.task} loss but the data is {task}: "
                      f"use {hint}")
    if args.class_weights:
        key = "pos_weight" if task == "multi-label" else "class_weights"
        accepted = loss.accepted_options(0)
        if key in args.options["loss"]:
            raise TkError(f"--class-weights {args.class_weights} and --opt loss.{key} both "
                          "set the class weights: keep one")
        if accepted is not None and key not in accepted:
            raise TkError(f"--class-weights: loss '{loss.name}' takes no {key} option")
