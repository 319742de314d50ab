"""The plugin contract of tk.

A plugin is any module (or object) with functions named after these hooks and marked with
``toolkit.plugin.hookspecs.hookimpl``. Built-in plugins and third-party packages load the
same way: through the entry-point group ``tk`` (or ``--plugin MODULE`` / ``TK_PLUGINS``).

Registration hooks receive a ``register`` callback owned by the core::

    register(name, factory, **info)

``name`` is the public name users type (``--backbone NAME``); ``factory`` builds the
component; ``info`` is free-form description shown by ``tk list`` (``description=...``,
``fallback=True`` yields the bare name to any other plugin registering it). The core records
which plugin owns each name; a name registered by two plugins is an error naming both, and
``plugin:name`` picks one. Register cheaply: import heavy libraries inside factories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "tk"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def tk_register_backbones(register: Register) -> None:
    """Register image backbones.

    Factory signature: ``factory(pretrained, **options) -> toolkit.model.backbone.Backbone``.

    ``pretrained`` is ``False`` (random initialisation), ``True`` (find the weights the
    framework would use: its cache, then a download; raise
    :class:`toolkit.errors.WeightsNotFoundError` naming the file and URL when neither works)
    or a path to a weight file (``.safetensors``, or ``.pth`` read with
    ``torch.load(weights_only=True)``) to load instead.

    The returned ``Backbone`` carries ``module`` (images ``[N,3,H,W]`` -> features
    ``[N,F]``), ``num_features`` (F), ``data_config`` (the preprocessing its weights expect),
    ``layer_groups`` (ordered input -> output, the unit of ``--freeze N``) and ``weights``
    (where the weights came from, with their sha256). Keep every pretrained layer except the
    final classifier.
    """


@hookspec
def tk_register_heads(register: Register) -> None:
    """Register classification heads.

    Factory signature: ``factory(num_features, num_classes, **options) -> torch.nn.Module``
    mapping features ``[N, num_features]`` to logits ``[N, num_classes]``.
    """


@hookspec
def tk_register_losses(register: Register) -> None:
    """Register losses.

    Factory signature: ``factory(**options) -> torch.nn.Module`` whose forward maps
    ``(logits [N,C], targets [N] int64)`` to a scalar tensor. The core passes
    ``num_classes`` in ``options`` only when the factory's signature accepts it.
    """


@hookspec
def tk_register_optimizers(register: Register) -> None:
    """Register optimizers.

    Factory signature: ``factory(param_groups, lr, weight_decay, **options) ->
    torch.optim.Optimizer``. ``param_groups`` is a list of dicts as torch expects; a group
    may carry its own ``lr`` (discriminative learning rates) and ``weight_decay`` (0 for
    norms and biases), which the optimizer must respect.
    """


@hookspec
def tk_register_datasets(register: Register) -> None:
    """Register datasets.

    Factory signature: ``factory(**options) -> toolkit.data.datasets.DatasetSource``, an object with

    - ``classes``: list of class names (index = label),
    - ``splits(train_transform, eval_transform, *, val_split, seed)`` returning
      ``(train, val)`` ``torch.utils.data.Dataset`` objects whose items are
      ``(image_tensor, label)``. The transforms take a PIL RGB image.

    Common options the core may pass: ``path`` (``--data``), ``num_classes`` (``--classes``),
    ``seed``.
    """


@hookspec(firstresult=True)
def tk_dataset_for_path(path: str) -> str | None:
    """Which registered dataset reads ``--data PATH``: return its name (``"imagefolder"``,
    ``"my-plugin:json-manifest"``), or ``None`` to let other plugins answer.

    Called in reverse registration order (third-party plugins before the built-ins), the
    first non-``None`` answer wins. The built-ins claim folders (``imagefolder``) and
    ``.csv`` files (``csv``); a plugin claims its own format, e.g. by extension. The chosen
    dataset's factory receives the path as its ``path`` option. Keep it cheap: look at the
    name or a few bytes, do not read the data.
    """


@hookspec
def tk_register_commands(cli: Any) -> None:
    """Add commands to the ``tk`` CLI.

    ``cli`` is the root ``click.Group``; call ``cli.add_command(...)`` or decorate with
    ``@cli.command()``. Keep imports of heavy libraries inside the command body.
    """


@hookspec
def tk_train_start(config: dict[str, Any]) -> None:
    """Called once before the first training epoch (on rank 0 only).

    ``config`` holds the resolved training arguments (backbone, head, loss, optimizer,
    epochs, batch size, lr, freeze, device, precision, classes...). Observers only: do not
    mutate it.
    """


@hookspec
def tk_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
    """Called after each epoch's validation (on rank 0 only).

    ``epoch`` starts at 1. ``metrics`` has ``train_loss``, ``train_acc``, ``val_loss``,
    ``val_acc`` (and ``val_top5`` with more than five classes), ``lr``, ``epoch_time``.
    """


@hookspec
def tk_model_saved(name: str, path: str, metadata: dict[str, Any]) -> None:
    """Called after a model was written to the store. ``path`` is its safetensors file."""
