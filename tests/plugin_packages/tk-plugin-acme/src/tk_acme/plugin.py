"""The entry point (``acme = "tk_acme.plugin"``): names components, imports nothing heavy.

- backbone ``acme-tinycnn``: a small CNN; ``pretrained=True`` looks for weights shipped in
  the package (there are none in this fixture: the error must not claim a download);
- backbone ``boom-net``: its factory has a bug (a plain ``ValueError``);
- dataset ``acme-json``: a JSON manifest, claimed for ``--data *.json``; a path ending in
  ``.crash`` makes ``tk_dataset_for_path`` itself fail;
- optimizer ``acme-sgd`` with ``default_lr=0.05``;
- command ``acme-hello`` (``--fail`` raises a ``KeyError``: a bug in a command);
- observers: ``tk_epoch_end`` appends ``(epoch, metrics)`` to ``$ACME_JOURNAL``;
  ``tk_model_saved`` raises when ``$ACME_FAIL_SAVED`` is set.
"""

from __future__ import annotations

import json
import os
from typing import Any

from toolkit.plugin.hookspecs import hookimpl


def tinycnn(pretrained: Any = False, width: int = 4) -> Any:
    from tk_acme.nets import tinycnn as build

    return build(pretrained, width=width)


def boom_net(pretrained: Any = False) -> Any:
    from tk_acme.nets import boom_net as build

    return build(pretrained)


def acme_json(path: str | None = None, num_classes: int | None = None) -> Any:
    from tk_acme.manifest import JsonManifest

    return JsonManifest(path)


def acme_sgd(param_groups: list[dict[str, Any]], lr: float, weight_decay: float,
             momentum: float = 0.9) -> Any:
    import torch

    return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, momentum=momentum)


@hookimpl
def tk_register_backbones(register: Any) -> None:
    register("acme-tinycnn", tinycnn, description="acme's tiny CNN (option: width)")
    register("boom-net", boom_net, description="a backbone whose factory has a bug")


@hookimpl
def tk_register_datasets(register: Any) -> None:
    register("acme-json", acme_json, description="images listed in a JSON manifest")


@hookimpl
def tk_register_optimizers(register: Any) -> None:
    register("acme-sgd", acme_sgd, default_lr=0.05, description="SGD with momentum")


@hookimpl
def tk_dataset_for_path(path: str) -> str | None:
    if path.endswith(".crash"):
        raise RuntimeError("manifest sniffer crashed")
    return "acme-json" if path.lower().endswith(".json") else None


@hookimpl
def tk_register_commands(cli: Any) -> None:
    import click

    @cli.command("acme-hello")
    @click.option("--fail", is_flag=True, help="Raise a KeyError (a bug in a command).")
    def hello(fail: bool) -> None:
        """Say hello (acme)."""
        if fail:
            {}["missing"]  # noqa: B018 - the deliberate bug
        click.echo("hello from acme")


@hookimpl
def tk_epoch_end(epoch: int, metrics: dict[str, Any]) -> None:
    journal = os.environ.get("ACME_JOURNAL")
    if journal:
        with open(journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"epoch": epoch, "metrics": metrics,
                                 "types": {k: type(v).__name__ for k, v in metrics.items()}})
                     + "\n")


@hookimpl
def tk_model_saved(name: str) -> None:
    if os.environ.get("ACME_FAIL_SAVED"):
        raise OSError(f"cannot upload {name}: no network")
