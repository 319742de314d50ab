"""Built-in losses. Single-label (targets: class indices, or soft targets ``[N, C]`` from
MixUp/CutMix): `cross-entropy` (label smoothing, class weights) and `focal`. Multi-label
(registered with ``task="multi-label"``; targets: multi-hot ``[N, C]`` floats): `bce`
(sigmoid binary cross-entropy with ``pos_weight``) and `asl` (asymmetric loss)."""

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
            if targets.dim() == 1:  # class indices
                y = F.one_hot(targets, logp.shape[-1]).to(logp.dtype)
            else:  # soft targets (MixUp / CutMix)
                y = targets.to(logp.dtype)
            if self.smoothing:
                y = (1 - self.smoothing) * y + self.smoothing / logp.shape[-1]
            # sum_c -y_c (1 - p_c)^gamma log p_c: with one-hot targets, the usual focal loss
            loss = -(y * (1 - logp.exp()).clamp(min=0).pow(self.gamma) * logp).sum(dim=-1)
            if self.weight is not None:
                w = (y * self.weight).sum(dim=-1)
                return (loss * w / y.sum(dim=-1).clamp(min=1e-12)).sum() / \
                    (w / y.sum(dim=-1).clamp(min=1e-12)).sum().clamp(min=1e-12)
            return loss.mean()

    return FocalLoss(float(gamma), _weights(class_weights, num_classes), float(label_smoothing))


def _pos_weight(pos_weight: Any, num_classes: int | None) -> Any:
    if pos_weight is None:
        return None
    import torch

    from toolkit.errors import TkError

    if isinstance(pos_weight, (int, float)) and not isinstance(pos_weight, bool):
        pos_weight = [pos_weight] * (num_classes or 1)
    w = _weights(pos_weight, num_classes)
    if not bool(torch.isfinite(w).all()):
        raise TkError("loss: pos_weight must be finite numbers")
    return w


def bce(pos_weight: Any = None, label_smoothing: float = 0.0,
        num_classes: int | None = None) -> Any:
    """Sigmoid binary cross-entropy over every class (multi-label): ``pos_weight`` (one
    number, or one per class) weighs the positives of each class."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from toolkit.errors import TkError

    if not 0.0 <= float(label_smoothing) < 1.0:
        raise TkError("loss 'bce': label_smoothing must be in [0, 1)")

    class BCELoss(nn.Module):
        def __init__(self, pos_weight: Any, smoothing: float):
            super().__init__()
            self.smoothing = smoothing
            self.register_buffer("pos_weight", pos_weight)

        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            y = targets.to(torch.float32)
            if self.smoothing:
                y = y * (1 - self.smoothing) + 0.5 * self.smoothing
            return F.binary_cross_entropy_with_logits(logits.float(), y,
                                                      pos_weight=self.pos_weight)

    return BCELoss(_pos_weight(pos_weight, num_classes), float(label_smoothing))


def asl(gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
        num_classes: int | None = None) -> Any:
    """Asymmetric loss (Ridnik et al. 2021) for multi-label: focusing ``gamma_pos`` on the
    positives, ``gamma_neg`` on the negatives, whose probabilities are shifted down by
    ``clip`` (easy negatives count for nothing). Summed over classes, averaged over images."""
    import torch
    from torch import nn

    from toolkit.errors import TkError

    if float(gamma_neg) < 0 or float(gamma_pos) < 0:
        raise TkError("loss 'asl': gamma_neg and gamma_pos must be >= 0")
    if not 0.0 <= float(clip) < 1.0:
        raise TkError("loss 'asl': clip must be in [0, 1)")

    class AsymmetricLoss(nn.Module):
        def __init__(self, gamma_neg: float, gamma_pos: float, clip: float):
            super().__init__()
            self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            y = targets.to(torch.float32)
            p = torch.sigmoid(logits.float())
            p_neg = (p - self.clip).clamp(min=0) if self.clip else p
            eps = 1e-8
            loss_pos = y * (1 - p).pow(self.gamma_pos) * torch.log(p.clamp(min=eps))
            loss_neg = (1 - y) * p_neg.pow(self.gamma_neg) * torch.log(
                (1 - p_neg).clamp(min=eps))
            return -(loss_pos + loss_neg).sum(dim=-1).mean()

    return AsymmetricLoss(float(gamma_neg), float(gamma_pos), float(clip))


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
    register(
        "bce",
        bce,
        default=True,
        task="multi-label",
        description="multi-label sigmoid binary cross-entropy (options: pos_weight, "
                    "label_smoothing)",
    )
    register(
        "asl",
        asl,
        task="multi-label",
        description="multi-label asymmetric loss (options: gamma_neg=4, gamma_pos=0, "
                    "clip=0.05)",
    )
