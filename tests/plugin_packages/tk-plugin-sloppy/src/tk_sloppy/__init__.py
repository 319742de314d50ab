"""Three hooks, two of them wrong: tk keeps the good one and reports the others.

- ``tk_register_backbones(registr)``: a misspelt argument (pluggy would refuse the whole
  plugin; tk leaves out this hook and says "did you mean 'register'");
- ``tk_register_heads`` without ``@hookimpl``: pluggy would ignore it silently;
- ``tk_register_losses``: fine, ``sloppy-loss`` is usable.
"""

from __future__ import annotations

from typing import Any

from toolkit.plugin.hookspecs import hookimpl


def _loss(**options: Any) -> Any:
    from torch import nn

    return nn.CrossEntropyLoss()


@hookimpl
def tk_register_backbones(registr: Any) -> None:
    registr("sloppy-net", print)


def tk_register_heads(register: Any) -> None:
    register("sloppy-head", print)


@hookimpl
def tk_register_losses(register: Any) -> None:
    register("sloppy-loss", _loss, description="plain cross-entropy")
