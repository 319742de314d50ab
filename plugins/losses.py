"""Built-in losses: `cross-entropy` (label smoothing, class weights) and `focal`."""

from __future__ import annotations

from typing import Any

from toolkit.plugin.hookspecs import hookimpl


def _weights(class_weights: Any, num_classes: int | None) -> Any:
    if class_weights is None:
        return None
    import torch

    from toolkit.errors import TkError

    if isinstance(class_weights, str):
        class_weights = [x for x in class_weights.replace(";", ",").split(",") if x.strip()]
    try:
        w = torch.tensor([float(x) for x in class_weights], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise TkError(f"loss: class_weights must be numbers ({exc})") from exc
    if num_classes is not None and len(w) != num_classes:
        raise TkError(f"loss: {len(w)} class_weights for {num_classes} classes")
    if (w < 0).any():
        raise TkError("loss: class_weights must not be negative")
    return w


def cross_entropy(
    label_smoothing: float = 0.0, class_weights: Any = None, num_classes: int | None = None
) -> Any:
    from torch import nn

    from toolkit.errors import TkError

    if not 0.0 <= float(label_smoothing) < 1.0:
        raise TkError("loss 'cross-entropy': label_smoothing must be in [0, 1)")
    return nn.CrossEntropyLoss(
        weight=_weights(class_weights, num_classes), label_smoothing=float(label_smoothing)
    )


def focal(
    gamma: float = 2.0,
    class_weights: Any = None,
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
) -> Any:
    """Focal loss (Lin et al. 2017) for multi-class logits: mean of
    ``-w_y (1 - p_y)^gamma log p_y``; ``gamma=0`` is weighted cross-entropy."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from toolkit.errors import TkError

    if float(gamma) < 0:
        raise TkError("loss 'focal': gamma must be >= 0")

    class FocalLoss(nn.Module):
        def __init__(self, gamma: float, weight: Any, smoothing: float):
            super().__init__()
            self.gamma = gamma
            self.smoothing = smoothing
            self.register_buffer("weight", weight if weight is not None else None)

        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logp = F.log_softmax(logits.float(), dim=-1)
            ce = F.nll_loss(logp, targets, reduction="none")
            if self.smoothing:
                ce = (1 - self.smoothing) * ce - self.smoothing * logp.mean(dim=-1)
            pt = logp.gather(1, targets[:, None]).squeeze(1).exp()
            loss = (1 - pt).clamp(min=0).pow(self.gamma) * ce
            if self.weight is not None:
                w = self.weight[targets]
                return (loss * w).sum() / w.sum().clamp(min=1e-12)
            return loss.mean()

    return FocalLoss(float(gamma), _weights(class_weights, num_classes), float(label_smoothing))


@hookimpl
def tk_register_losses(register: Any) -> None:
    register(
        "cross-entropy",
        cross_entropy,
        default=True,
        description="softmax cross-entropy (options: label_smoothing, class_weights)",
    )
    register(
        "focal",
        focal,
        description="focal loss (options: gamma=2, class_weights, label_smoothing)",
    )
