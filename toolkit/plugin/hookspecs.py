"""The plugin contract of tk: every hook, typed, each parameter documented.

A plugin is a module (or object) whose functions are named after these hooks and marked
with :data:`hookimpl`; it is loaded through the entry-point group ``tk`` (or ``--plugin
MODULE`` / ``TK_PLUGINS``). A hook may take any subset of its parameters. docs/plugins.md
is the long form of this file (with a walkthrough); the two are tested to agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypedDict

import pluggy

PROJECT = "tk"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callback the registration hooks receive (owned by the core)."""

    def __call__(self, name: str, factory: Callable[..., Any], **info: Any) -> None:
        """Register one component.

        :param name: what users type (``--backbone NAME``): a non-empty string without ``:``.
        :param factory: builds the component; its signature depends on the kind (see each
            hook). tk reads it to check ``--opt`` names and to pass ``num_classes`` /
            ``seed`` only where named.
        :param info: free-form, shown by ``tk list``. Known keys: ``description`` (one
            line), ``default=True`` (used when the user names none of this kind),
            ``fallback=True`` (yield the bare name to any other plugin registering it),
            ``default_lr`` (optimizers: the learning rate used when ``--lr`` is not given).
        """


class EpochMetrics(TypedDict, total=False):
    """What ``tk_epoch_end`` receives as ``metrics`` (``val_top5`` only with more than five
    classes, ``val_map`` and the F1s only for multi-label data, ``ema`` only with ``--ema``,
    which also adds ``raw_val_loss``, ``ema_val_loss`` and ``raw_`` / ``ema_`` copies of
    the monitored metric; every other key always). Later versions of tk may add keys:
    ignore unknown ones."""

    epoch: int  # the epoch just finished, from 1
    train_loss: float  # mean training loss over the epoch's samples
    train_acc: float  # training top-1 accuracy, 0..1
    lr: float  # the head's learning rate at the end of the epoch
    images_per_s: float  # training throughput of the epoch (all processes together)
    val_loss: float  # mean validation loss
    val_acc: float  # validation top-1 accuracy, 0..1
    val_top5: float  # validation top-5 accuracy, 0..1 (more than five classes only)
    val_samples: int  # validation images counted
    epoch_time: float  # seconds the epoch took, training and validation
    val_map: float  # multi-label: mean average precision over the classes, 0..1
    val_f1_micro: float  # multi-label: micro F1 at threshold 0.5
    val_f1_macro: float  # multi-label: macro F1 at threshold 0.5
    ema: float  # --ema: 1.0 when the val metrics are the EMA weights', 0.0 the raw ones'


@hookspec
def tk_register_backbones(register: Register) -> None:
    """Register image backbones.

    :param register: call ``register(name, factory, **info)`` per backbone. The factory is
        ``factory(pretrained, **options) -> toolkit.model.backbone.Backbone``; ``pretrained``
        is ``False`` (random), ``True`` (the weights your framework uses: find them with
        :func:`toolkit.model.weights.resolve_pretrained`, which raises
        :class:`toolkit.errors.WeightsNotFoundError` saying what it tried) or the path of a
        weight file (``--weights FILE`` or imported weights). Keep every pretrained layer
        except the final classifier.
    """


@hookspec
def tk_register_heads(register: Register) -> None:
    """Register classification heads.

    :param register: call ``register(name, factory, **info)``; the factory is
        ``factory(num_features, num_classes, **options) -> torch.nn.Module`` mapping
        features ``[N, num_features]`` to logits ``[N, num_classes]``.
    """


@hookspec
def tk_register_losses(register: Register) -> None:
    """Register losses.

    :param register: call ``register(name, factory, **info)``; the factory is
        ``factory(**options) -> torch.nn.Module`` whose forward maps ``(logits [N,C],
        targets [N] int64)`` to a scalar tensor. ``num_classes`` is passed only when the
        factory's signature names it.
    """


@hookspec
def tk_register_optimizers(register: Register) -> None:
    """Register optimizers.

    :param register: call ``register(name, factory, **info)``; the factory is
        ``factory(param_groups, lr, weight_decay, **options) -> torch.optim.Optimizer``
        and must honour a group's own ``lr`` and ``weight_decay``. ``info`` may carry
        ``default_lr=3e-4``: the learning rate tk uses when ``--lr`` is not given.
    """


@hookspec
def tk_register_datasets(register: Register) -> None:
    """Register datasets.

    :param register: call ``register(name, factory, **info)``; the factory is
        ``factory(**options) -> toolkit.data.datasets.DatasetSource`` (``classes`` and
        ``splits(train_transform, eval_transform, *, val_split, seed)``). tk passes
        ``path`` (``--data``), ``val_path`` (``--val-data``), ``num_classes`` and ``seed``
        when the signature names them.
    """


@hookspec
def tk_register_loggers(register: Register) -> None:
    """Register experiment loggers (what ``tk finetune --log NAME`` selects).

    :param register: call ``register(name, factory, **info)``; the factory is
        ``factory(log_dir, run_name) -> object`` and is called once per run that
        selects it, before the first epoch (rank 0 only). ``log_dir`` is the run's own log
        folder (``--log-dir DIR``/NAME, else ``$TK_HOME/runs/NAME/logs``; the logger
        creates it), ``run_name`` the model's name; tk passes ``log_root`` (``--log-dir`` as
        given, absolute, or None) only when the signature names it. The object's methods
        marked with ``@hookimpl`` (``tk_train_start``, ``tk_epoch_end``,
        ``tk_model_saved``, ``tk_train_end``) observe that run only. Raise a
        :class:`toolkit.errors.TkError` naming the extra to install when a library is
        missing.
    """


@hookspec(firstresult=True)
def tk_dataset_for_path(path: str) -> str | None:
    """Say which registered dataset reads ``--data PATH`` (first answer wins; third-party
    plugins are asked before the built-ins, which claim folders and ``.csv`` files).

    :param path: the ``--data`` argument as given. Look at its name or a few bytes, not
        the data. Return a dataset name (``"json-manifest"`` or ``"plugin:name"``) or
        ``None`` to let the next plugin answer. The dataset's factory gets the path,
        made absolute, as its ``path`` option.
    """


@hookspec
def tk_register_commands(cli: Any) -> None:
    """Add commands to the ``tk`` CLI.

    :param cli: the root ``click.Group``: ``cli.add_command(cmd)``. A name tk or an earlier
        plugin uses already is refused. Import heavy libraries inside the command body.
    """


@hookspec
def tk_train_start(config: dict[str, Any]) -> None:
    """Observer: called once before the first training epoch (rank 0 only).

    :param config: the resolved training arguments (component names and options,
        ``dataset``, ``epochs``, ``batch_size``, ``lr``, ``freeze``, ``device``,
        ``precision``, ``classes``...). Read it, do not mutate it.
    """


@hookspec
def tk_epoch_end(epoch: int, metrics: EpochMetrics) -> None:
    """Observer: called after each epoch's validation (rank 0 only).

    :param epoch: the epoch just finished, counting from 1.
    :param metrics: that epoch's numbers, see :class:`EpochMetrics` for every key and type.
    """


@hookspec
def tk_model_saved(name: str, path: str, metadata: dict[str, Any],
                   artifacts: dict[str, str]) -> None:
    """Observer: called after a model was written to the store (rank 0 only).

    :param name: the model's name in the store.
    :param path: its safetensors file.
    :param metadata: what ``tk store show NAME --json`` prints (spec, classes, data
        config, training, metrics, weights, components...).
    :param artifacts: the files drawn for it, by kind: ``{"curves": PNG path,
        "confusion": PNG path}`` (a kind is missing when its plot could not be drawn).
    """


@hookspec
def tk_train_end(name: str, status: str) -> None:
    """Observer: called once when a run that called ``tk_train_start`` ends, however it
    ends (rank 0 only): after ``tk_model_saved`` when it finished. Close files here.

    :param name: the run's model name (the model exists only when ``status`` is
        ``"finished"``).
    :param status: ``"finished"``, ``"failed"`` (an error), ``"interrupted"`` (Ctrl-C)
        or ``"stopped"`` (the caller's epoch callback ended it, e.g. a pruned trial of
        ``tk tune``).
    """
