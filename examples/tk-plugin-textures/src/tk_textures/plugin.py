"""The entry point of tk-plugin-textures (``[project.entry-points.tk] textures = ...``).

tk imports this module for every command, even ``tk --help``: it only names components and
points at their factories. The factories import torch (through the component modules) when
tk actually builds something.
"""

from __future__ import annotations

from typing import Any

from toolkit.plugin.hookspecs import hookimpl


# -- factories ---------------------------------------------------------------------------
# Thin wrappers: registering costs nothing, the component modules (and torch) load when tk
# builds something. Each lists its options explicitly: tk reads the signature to reject a
# mistyped `--opt backbone.widht=8` and to pass `num_classes` / `seed` only where accepted.
def _backbone(pretrained: Any = False, width: int = 16) -> Any:
    from tk_textures.backbone import texture_cnn

    return texture_cnn(pretrained, width=width)


def _head(num_features: int, num_classes: int, scale: float = 16.0,
          learn_scale: bool = True) -> Any:
    from tk_textures.head import cosine_head

    return cosine_head(num_features, num_classes, scale=scale, learn_scale=learn_scale)


def _loss(epsilon: float = 1.0, label_smoothing: float = 0.0) -> Any:
    from tk_textures.loss import poly1_loss

    return poly1_loss(epsilon=epsilon, label_smoothing=label_smoothing)


def _optimizer(param_groups: list[dict[str, Any]], lr: float, weight_decay: float,
               beta1: float = 0.9, beta2: float = 0.99) -> Any:
    from tk_textures.optim import lion

    return lion(param_groups, lr, weight_decay, beta1=beta1, beta2=beta2)


def _dataset(num_classes: int | None = None, per_class: int = 48, size: int = 40,
             seed: int | None = None, path: str | None = None) -> Any:
    from tk_textures.data import textures_dataset

    return textures_dataset(num_classes=num_classes, per_class=per_class, size=size,
                            seed=seed, path=path)


def _manifest(path: str | None = None) -> Any:
    from toolkit.errors import DataError

    if path is None:
        raise DataError("dataset 'json-manifest' reads a file: pass --data FILE.json")
    from tk_textures.manifest import JsonManifest  # json only: no torch until splits()

    return JsonManifest(path)


# -- registration hooks ----------------------------------------------------------------------
@hookimpl
def tk_register_backbones(register: Any) -> None:
    register("texture-cnn", _backbone,
             description="small CNN, 64 features, 32 px; pretrained on textures (option: width)")


@hookimpl
def tk_register_heads(register: Any) -> None:
    register("cosine", _head,
             description="cosine-similarity classifier (options: scale=16, learn_scale=true)")


@hookimpl
def tk_register_losses(register: Any) -> None:
    register("poly1", _loss,
             description="Poly-1 cross-entropy (options: epsilon=1.0, label_smoothing=0)")


@hookimpl
def tk_register_optimizers(register: Any) -> None:
    # Lion wants a 3-10x smaller learning rate than AdamW: tk uses default_lr when the
    # user gives no --lr
    register("lion", _optimizer, default_lr=1e-4,
             description="Lion, sign-momentum (options: beta1, beta2)")


@hookimpl
def tk_register_datasets(register: Any) -> None:
    register("textures", _dataset,
             description="generated textures, 2-6 classes (options: per_class=48, size=40)")
    register("json-manifest", _manifest,
             description="images listed in a JSON manifest (tk finetune --data FILE.json)")


@hookimpl
def tk_dataset_for_path(path: str) -> str | None:
    # asked for every --data PATH before the built-ins: claim only our own format, by name
    from tk_textures.manifest import claims

    return "json-manifest" if claims(path) else None


@hookimpl
def tk_register_commands(cli: Any) -> None:
    from tk_textures.commands import preview  # click only, no torch

    cli.add_command(preview)


# -- lifecycle observers ---------------------------------------------------------------------
@hookimpl
def tk_train_start(config: dict[str, Any]) -> None:
    from tk_textures.journal import record

    record("train_start", config=config)


@hookimpl
def tk_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
    from tk_textures.journal import record

    record("epoch_end", epoch=epoch, metrics=metrics)


@hookimpl
def tk_model_saved(name: str, path: str, metadata: dict[str, Any],
                   artifacts: dict[str, str]) -> None:
    from tk_textures.journal import record

    record("model_saved", name=name, path=path, metadata_keys=sorted(metadata),
           artifacts=sorted(artifacts))


@hookimpl
def tk_train_end(name: str, status: str) -> None:
    from tk_textures.journal import record

    record("train_end", name=name, status=status)


# -- a logger: `tk finetune --log journal` ----------------------------------------------------
def _journal_logger(log_dir: str, run_name: str) -> Any:
    from tk_textures.journal import JournalLogger

    return JournalLogger(log_dir, run_name)


@hookimpl
def tk_register_loggers(register: Any) -> None:
    register("journal", _journal_logger, description="journal.jsonl in the run's log folder")
