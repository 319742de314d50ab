"""Built-in classification heads: `linear` and `mlp`."""

from __future__ import annotations

from typing import Any

from toolkit.plugin.hookspecs import hookimpl


def linear_head(num_features: int, num_classes: int, dropout: float = 0.0) -> Any:
    """Dropout (optional) then one Linear layer."""
    from torch import nn

    layers: list[nn.Module] = []
    if dropout:
        layers.append(nn.Dropout(float(dropout)))
    layers.append(nn.Linear(num_features, num_classes))
    return nn.Sequential(*layers)


def mlp_head(
    num_features: int,
    num_classes: int,
    hidden: int = 512,
    dropout: float = 0.2,
    layers: int = 1,
    activation: str = "gelu",
    norm: bool = True,
) -> Any:
    """``layers`` hidden blocks of Linear -> (LayerNorm) -> activation -> Dropout, then Linear."""
    from torch import nn

    from toolkit.errors import TkError

    acts = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
    if activation not in acts:
        raise TkError(f"head 'mlp': unknown activation '{activation}' (one of: {', '.join(acts)})")
    if int(hidden) < 1 or int(layers) < 1:
        raise TkError("head 'mlp': hidden and layers must be positive")
    blocks: list[nn.Module] = []
    width = num_features
    for _ in range(int(layers)):
        blocks.append(nn.Linear(width, int(hidden)))
        if norm:
            blocks.append(nn.LayerNorm(int(hidden)))
        blocks.append(acts[activation]())
        if dropout:
            blocks.append(nn.Dropout(float(dropout)))
        width = int(hidden)
    blocks.append(nn.Linear(width, num_classes))
    return nn.Sequential(*blocks)


@hookimpl
def tk_register_heads(register: Any) -> None:
    register("linear", linear_head, default=True, description="one Linear layer (options: dropout)")
    register(
        "mlp",
        mlp_head,
        description="MLP (options: hidden=512, layers=1, dropout=0.2, activation=gelu, norm=true)",
    )
